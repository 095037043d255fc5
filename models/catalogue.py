"""Well-known networks by name: torchvision's and MONAI's, with validated arguments and cuts.

``medsplit models`` lists them. They are built without weights (nothing is downloaded at run
time; ``weights: FILE`` loads a local state dict), adapted to the plan's input channels and
classes, and cut by module name (``models.graph_split``). Each has default cuts that keep the
stem and the classifier at the site: the plan may leave ``cut`` and ``tail_cut`` out.

torchvision and MONAI are imported when an entry is built, not before: the ``models`` extra
installs them (``pip install medsplit[models]``).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any, Literal, cast

from pydantic import Field
from torch import nn

from models.architectures import _Args

log = logging.getLogger(__name__)


def torchvision_models() -> ModuleType:
    """``torchvision.models``, also where torchvision's compiled operators do not load.

    A torchvision wheel built for CUDA next to a CPU build of torch (or any mismatched pair)
    cannot load its C++ operators; torchvision then skips their registration except for two
    (``nms``, ``qnms``), whose import fails. The classification networks need none of them, so
    those two are declared without a kernel and the import retried; calling them then fails
    with torch's own "no kernel" error, which is the truth.
    """
    try:
        return importlib.import_module("torchvision.models")
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    import sys  # noqa: PLC0415

    import torch  # noqa: PLC0415

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    library = torch.library.Library("torchvision", "FRAGMENT")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP_ALIVE.append(library)
    log.warning(
        "torchvision's compiled operators do not load with this torch build (%s); its "
        "classification networks work, its detection operators do not",
        torch.__version__,
    )
    return importlib.import_module("torchvision.models")


_KEEP_ALIVE: list[object] = []


def _first_conv(conv: nn.Conv2d | nn.Conv3d, in_channels: int) -> nn.Module:
    """The stem convolution for ``in_channels`` inputs (grey-scale radiographs: 1)."""
    if conv.in_channels == in_channels:
        return conv
    return type(conv)(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )


class ImageArgs(_Args):
    """A 2-D classification network's inputs and outputs."""

    in_channels: int = Field(3, ge=1)
    image_size: int = Field(224, ge=32)
    num_classes: int = Field(2, ge=2)

    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.image_size, self.image_size)


class MonaiArgs(_Args):
    """A MONAI network's dimensionality, inputs and outputs (3-D: a cube of ``image_size``)."""

    spatial_dims: Literal[2, 3] = 2
    in_channels: int = Field(1, ge=1)
    image_size: int = Field(64, ge=16)
    num_classes: int = Field(2, ge=2)

    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *([self.image_size] * self.spatial_dims))


def build_densenet121(args: ImageArgs) -> nn.Module:
    model: Any = torchvision_models().densenet121(weights=None, num_classes=args.num_classes)
    model.features.conv0 = _first_conv(model.features.conv0, args.in_channels)
    return cast(nn.Module, model)


def build_resnet50(args: ImageArgs) -> nn.Module:
    model: Any = torchvision_models().resnet50(weights=None, num_classes=args.num_classes)
    model.conv1 = _first_conv(model.conv1, args.in_channels)
    return cast(nn.Module, model)


def build_efficientnet_b0(args: ImageArgs) -> nn.Module:
    model: Any = torchvision_models().efficientnet_b0(weights=None, num_classes=args.num_classes)
    stem = model.features[0]
    stem[0] = _first_conv(stem[0], args.in_channels)
    return cast(nn.Module, model)


def build_monai_densenet121(args: MonaiArgs) -> nn.Module:
    from monai.networks.nets.densenet import DenseNet121  # noqa: PLC0415

    return DenseNet121(
        spatial_dims=args.spatial_dims,
        in_channels=args.in_channels,
        out_channels=args.num_classes,
    )


class Monai3dArgs(MonaiArgs):
    """As ``MonaiArgs``, 3-D by default (CT, MR volumes)."""

    spatial_dims: Literal[2, 3] = 3


def build_monai_resnet18(args: MonaiArgs) -> nn.Module:
    from monai.networks.nets.resnet import resnet18  # noqa: PLC0415

    model: nn.Module = resnet18(
        spatial_dims=args.spatial_dims,
        n_input_channels=args.in_channels,
        num_classes=args.num_classes,
    )
    return model
