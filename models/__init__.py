"""Architectures, split plans, and splitting / re-assembling models. No networking here."""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.config_errors import ConfigError
    from models.plan import ModelSpec, SplitPlan, load_plan
    from models.plan_names import builtin_plan_names
    from models.registry import UnknownArchitectureError, build, layer_names, names
    from models.split import (
        SplitModel,
        assemble,
        cut_shapes,
        select_state,
        shared_state,
        split_model,
    )

_EXPORTS = {
    "ConfigError": "models.config_errors",
    "ModelSpec": "models.plan",
    "SplitModel": "models.split",
    "SplitPlan": "models.plan",
    "UnknownArchitectureError": "models.registry",
    "assemble": "models.split",
    "build": "models.registry",
    "builtin_plan_names": "models.plan_names",
    "cut_shapes": "models.split",
    "layer_names": "models.registry",
    "load_plan": "models.plan",
    "names": "models.registry",
    "select_state": "models.split",
    "shared_state": "models.split",
    "split_model": "models.split",
}


def __getattr__(name: str) -> Any:
    """Names resolve on first use, so that reading a config file does not load torch."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "ConfigError",
    "ModelSpec",
    "SplitModel",
    "SplitPlan",
    "UnknownArchitectureError",
    "assemble",
    "build",
    "builtin_plan_names",
    "cut_shapes",
    "layer_names",
    "load_plan",
    "names",
    "select_state",
    "shared_state",
    "split_model",
]
