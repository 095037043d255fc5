"""Architectures, split plans, and splitting / re-assembling models. No networking here."""

from models.config_errors import ConfigError
from models.plan import ModelSpec, SplitPlan, builtin_plan_names, load_plan
from models.registry import UnknownArchitectureError, build, layer_names, names
from models.split import SplitModel, assemble, cut_shapes, select_state, shared_state, split_model

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
