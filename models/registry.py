"""The registry of architectures: a name, a validated argument schema and a builder.

A job or plan names an architecture and its arguments; the registry validates the arguments
against the architecture's own schema so that a typo (``num_clases``) is refused with the field
name instead of surfacing later as a shape error deep inside training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from models import catalogue
from models.architectures import (
    CnnArgs,
    MlpArgs,
    ResNet18Args,
    build_cnn,
    build_mlp,
    build_resnet18,
)
from models.vertical import VerticalArgs, build_vertical

ArgsT = TypeVar("ArgsT", bound=BaseModel)


class UnknownArchitectureError(KeyError):
    """The requested architecture name is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Architecture(Generic[ArgsT]):
    """One registered architecture.

    ``args_schema`` validates keyword arguments; ``builder`` turns validated arguments into an
    ``nn.Sequential`` of named blocks, or, for a ``traced`` entry of the catalogue, any network
    that ``models.graph_split`` cuts at module names (``cuts``: its default cut and tail cut).
    """

    name: str
    description: str
    args_schema: type[ArgsT]
    builder: Callable[[ArgsT], nn.Module]
    traced: bool = False
    cuts: tuple[str, str] | None = None

    def parse_args(self, args: Mapping[str, Any]) -> ArgsT:
        """Validate raw arguments; raises ``pydantic.ValidationError`` naming the bad field."""
        return self.args_schema.model_validate(dict(args))

    def _coerce(self, args: Mapping[str, Any] | ArgsT | None) -> ArgsT:
        if isinstance(args, BaseModel):
            return args
        return self.parse_args(args or {})

    def build(self, args: Mapping[str, Any] | ArgsT | None = None) -> nn.Module:
        return self.builder(self._coerce(args))

    def input_shape(self, args: Mapping[str, Any] | ArgsT | None = None) -> tuple[int, ...]:
        """Shape of one input sample (no batch dimension)."""
        shape: tuple[int, ...] = self._coerce(args).input_shape()  # type: ignore[attr-defined]
        return shape


_REGISTRY: dict[str, Architecture[Any]] = {}


def register(architecture: Architecture[Any]) -> None:
    """Add an architecture; a second registration under the same name is refused."""
    if architecture.name in _REGISTRY:
        raise ValueError(f"architecture {architecture.name!r} is already registered")
    _REGISTRY[architecture.name] = architecture


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Architecture[Any]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; allowed: {', '.join(names())}"
        ) from None


def build(name: str, args: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a freshly initialised model (uses the global torch RNG for initial weights)."""
    return get(name).build(args)


def layer_names(name: str, args: Mapping[str, Any] | None = None) -> list[str]:
    """Names of the top-level blocks, without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        return list(build(name, args)._modules)


register(Architecture("mlp", "MLP for EHR feature vectors", MlpArgs, build_mlp))
register(Architecture("cnn", "small conv net for 1-channel images", CnnArgs, build_cnn))
register(Architecture("resnet18", "ResNet-18 for 1-channel images", ResNet18Args, build_resnet18))
register(
    Architecture(
        "vertical",
        "parties' heads over their own columns, merged, then a top network (models.vertical)",
        VerticalArgs,
        build_vertical,
    )
)
# The catalogue (models.catalogue): traced networks, cut after module names.
_CATALOGUE: list[tuple[str, str, type[BaseModel], Callable[[Any], nn.Module], tuple[str, str]]] = [
    ("torchvision.densenet121", "torchvision DenseNet-121 (2-D images)", catalogue.ImageArgs,
     catalogue.build_densenet121, ("features.transition1", "features")),
    ("torchvision.resnet50", "torchvision ResNet-50 (2-D images)", catalogue.ImageArgs,
     catalogue.build_resnet50, ("layer1", "layer4")),
    ("torchvision.efficientnet_b0", "torchvision EfficientNet-B0 (2-D images)",
     catalogue.ImageArgs, catalogue.build_efficientnet_b0, ("features.2", "features")),
    ("monai.DenseNet121", "MONAI DenseNet-121 (2-D or 3-D: spatial_dims)", catalogue.MonaiArgs,
     catalogue.build_monai_densenet121, ("features.transition1", "features")),
    ("monai.resnet18", "MONAI ResNet-18 (3-D by default: spatial_dims)", catalogue.Monai3dArgs,
     catalogue.build_monai_resnet18, ("layer1", "layer4")),
]  # fmt: skip
for _name, _description, _schema, _builder, _cuts in _CATALOGUE:
    register(Architecture(_name, _description, _schema, _builder, traced=True, cuts=_cuts))

__all__ = [
    "Architecture",
    "UnknownArchitectureError",
    "ValidationError",
    "build",
    "get",
    "layer_names",
    "names",
    "register",
]
