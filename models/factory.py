"""A network from code the plan names (``factory: "package.module:function"``), and its weights.

Importing a module runs its code, so who may name a factory matters. A site imports only the
factories its own ``site.yaml`` allows (``models.allow``, shell patterns over
``package.module:function``); the aggregator's job spec reaches the site as data and is checked
against that list *before* anything is imported (``check_allowed``). The built-in catalogue is
always allowed. Processes that own their plan (the aggregator, the demo, the command line)
allow any factory.

Weights come from a local file only, never a download: safetensors, or a torch file read with
``weights_only=True``, checked against the network key by key.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.config_errors import ModelError

FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class FactoryError(ModelError):
    """A factory that may not be, or cannot be, used; the message names it."""


def check_allowed(factory: str, allow: Iterable[str] | None) -> None:
    """Raise ``FactoryError`` unless ``factory`` matches one of the allowed patterns (None:
    a process that owns its plan, which allows any)."""
    if allow is None:
        return
    patterns = tuple(allow)
    if not any(fnmatch.fnmatchcase(factory, pattern) for pattern in patterns):
        raise FactoryError(
            f"factory {factory!r} is not allowed on this site (models.allow in site.yaml: "
            f"{', '.join(patterns) or 'nothing beyond the built-in catalogue'})"
        )


def import_factory(factory: str) -> Any:
    """The callable ``package.module:function`` names (allowed when its plan was read)."""
    if not FACTORY_PATTERN.match(factory):
        raise FactoryError(f"factory {factory!r} is not of the form package.module:function")
    module_name, _, attr = factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FactoryError(
            f"factory {factory!r}: cannot import {module_name!r} ({exc}); is the package "
            "installed or on PYTHONPATH?"
        ) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise FactoryError(f"factory {factory!r}: {module_name} has no callable {attr!r}")
    return function


def call_factory(factory: str, args: Mapping[str, Any]) -> nn.Module:
    """The network the factory returns for ``args``; anything but an ``nn.Module`` is refused."""
    function = import_factory(factory)
    try:
        model = function(**args)
    except TypeError as exc:
        raise FactoryError(f"factory {factory!r} refused its args: {exc}") from None
    if not isinstance(model, nn.Module):
        raise FactoryError(f"factory {factory!r} returned {type(model).__name__}, not nn.Module")
    return model


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (``weights_only=True``; never pickle).

    Read once while the file is unchanged: a plan is validated and its model built several
    times in one process (meta build, each party's seeded build), each loading the same file.
    The tensors are shared; ``load_state_dict`` copies them into the model."""
    if not path.is_file():
        raise FactoryError(f"weights: {path} is not a file")
    stat = path.stat()
    return dict(_read_weights(path.resolve(), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _read_weights(path: Path, mtime_ns: int, size: int) -> dict[str, torch.Tensor]:
    # mtime_ns and size only key the cache: a file rewritten in place is read again.
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError  # noqa: PLC0415
        from safetensors.torch import load_file  # noqa: PLC0415

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise FactoryError(
                f"weights: {path}: not a readable safetensors file ({exc})"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        raise FactoryError(
            f"weights: {path}: not a state dict torch can read safely ({exc})"
        ) from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # a training checkpoint's weights
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise FactoryError(f"weights: {path}: expected a mapping of names to tensors")
    return dict(state)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load ``path`` into ``model``, refusing a missing, unexpected or misshapen key by name."""
    state = read_weights(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise FactoryError(f"weights: {path} lacks {missing[0]!r} ({len(missing)} key(s) missing)")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise FactoryError(
            f"weights: {path} has {unexpected[0]!r}, which the network does not "
            f"({len(unexpected)} unexpected key(s))"
        )
    for key, tensor in own.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise FactoryError(
                f"weights: {path}: {key!r} has shape {tuple(state[key].shape)}, the network "
                f"expects {tuple(tensor.shape)}"
            )
    if any(t.is_meta for t in own.values()):
        return  # shapes are all a meta-device build can check
    model.load_state_dict(state)
