"""The declarative ``SplitPlan``: where a model is cut and which tensors are shared.

A plan names an architecture and two things about it:

* **cuts** between consecutive top-level blocks. ``cut`` ends the edge *head*; ``tail_cut``
  (U-shaped split learning only) starts the edge *tail*; the blocks in between are the
  aggregator's *trunk*. A cut is a block name ("the cut is after this block") or an integer
  ("after this many blocks").
* which state-dict entries are **shared** (averaged across sites) and which are **private**
  (never leave the site). Entries are block names (everything in the block) or shell-style
  patterns over state-dict keys (``layer4.*.bn*``). ``shared`` defaults to everything that is
  not private.

Everything is checked against the real architecture when the plan is loaded, so a typo fails at
start-up with the field, the bad value and the allowed values, not mid-training.
"""

from __future__ import annotations

import fnmatch
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from models.config_errors import ConfigError, load_yaml_mapping, validate
from models.plan_names import BUILTIN_PLANS_DIR, builtin_plan_names

if TYPE_CHECKING:
    import torch


def _registry() -> ModuleType:
    """The architectures, imported on first use: reading a config must not load torch."""
    from models import registry  # noqa: PLC0415

    return registry


def _torch() -> ModuleType:
    import torch  # noqa: PLC0415

    return torch


class ModelSpec(BaseModel):
    """An architecture name and its arguments, validated against that architecture."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    args: dict[str, Any] = Field(default_factory=dict)

    _layers: tuple[str, ...] = PrivateAttr(default=())
    _state_keys: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("name")
    @classmethod
    def _known_architecture(cls, name: str) -> str:
        if name not in _registry().names():
            raise ValueError(
                f"unknown architecture {name!r}; allowed: {', '.join(_registry().names())}"
            )
        return name

    @field_validator("args")
    @classmethod
    def _valid_args(cls, args: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is None:
            return args
        try:
            parsed = _registry().get(name).parse_args(args)
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            raise ValueError(f"invalid arguments for {name!r}: {details}") from None
        dumped: dict[str, Any] = parsed.model_dump()
        return dumped

    @model_validator(mode="after")
    def _describe_structure(self) -> ModelSpec:
        # Built on the meta device: names and shapes only, no memory for weights.
        with _torch().device("meta"):
            model = self.build()
        self._layers = tuple(model._modules)
        self._state_keys = tuple(model.state_dict())
        return self

    @property
    def layers(self) -> tuple[str, ...]:
        """Top-level block names, in forward order."""
        return self._layers

    @property
    def state_keys(self) -> tuple[str, ...]:
        """Every state-dict key of the full model (parameters and buffers)."""
        return self._state_keys

    @property
    def input_shape(self) -> tuple[int, ...]:
        shape: tuple[int, ...] = _registry().get(self.name).input_shape(self.args)
        return shape

    def build(self, seed: int | None = None) -> torch.nn.Sequential:
        """The model; with ``seed``, initialised exactly as ``torch.manual_seed(seed)`` would.

        Seeded builds leave the global generator alone and hold a lock, so several parties of
        one job built at once in one process (threads, in tests and experiments) still start
        from identical weights.
        """
        if seed is None:
            return cast("torch.nn.Sequential", _registry().build(self.name, self.args))
        with _SEEDED_BUILD, _torch().random.fork_rng(devices=[]):
            _torch().manual_seed(seed)
            return cast("torch.nn.Sequential", _registry().build(self.name, self.args))


_SEEDED_BUILD = threading.Lock()


def _cut_position(value: str | int, layers: tuple[str, ...]) -> int:
    """Number of blocks before the cut; raises ValueError naming the allowed values."""
    allowed = ", ".join(layers[:-1])
    if isinstance(value, int):
        if not 1 <= value <= len(layers) - 1:
            raise ValueError(
                f"cut {value} is out of range; a model of {len(layers)} blocks allows "
                f"1..{len(layers) - 1}, or a block name: {allowed}"
            )
        return value
    if value not in layers:
        raise ValueError(f"unknown layer {value!r}; allowed: {allowed}")
    if value == layers[-1]:
        raise ValueError(
            f"a cut after the last block {value!r} leaves an empty segment; allowed: {allowed}"
        )
    return layers.index(value) + 1


def _expand(patterns: list[str], spec: ModelSpec) -> set[str]:
    """State-dict keys selected by block names or shell patterns; unknown entries are refused."""
    selected: set[str] = set()
    for pattern in patterns:
        if pattern in spec.layers:
            hits = {k for k in spec.state_keys if k.startswith(pattern + ".")}
        else:
            hits = {k for k in spec.state_keys if fnmatch.fnmatchcase(k, pattern)}
        if not hits:
            raise ValueError(
                f"{pattern!r} matches no layer or parameter; layers: {', '.join(spec.layers)}"
            )
        selected |= hits
    return selected


class SplitPlan(BaseModel):
    """Which blocks run where, and which tensors are shared or private. See module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelSpec
    cut: str | int = Field(description="the head ends after this block (name or block count)")
    tail_cut: str | int | None = Field(
        None, description="U-shaped: the tail starts after this block; omit for vanilla split"
    )
    shared: list[str] | None = Field(
        None, description="blocks or key patterns averaged across sites; default: all not private"
    )
    private: list[str] = Field(
        default_factory=list, description="blocks or key patterns kept on site"
    )

    _head: tuple[str, ...] = PrivateAttr(default=())
    _trunk: tuple[str, ...] = PrivateAttr(default=())
    _tail: tuple[str, ...] = PrivateAttr(default=())
    _shared_keys: frozenset[str] = PrivateAttr(default=frozenset())
    _private_keys: frozenset[str] = PrivateAttr(default=frozenset())

    @field_validator("cut")
    @classmethod
    def _valid_cut(cls, value: str | int, info: ValidationInfo) -> str | int:
        spec = info.data.get("model")
        if spec is not None:
            _cut_position(value, spec.layers)
        return value

    @field_validator("tail_cut")
    @classmethod
    def _valid_tail_cut(cls, value: str | int | None, info: ValidationInfo) -> str | int | None:
        spec, cut = info.data.get("model"), info.data.get("cut")
        if value is None or spec is None or cut is None:
            return value
        head_end = _cut_position(cut, spec.layers)
        tail_start = _cut_position(value, spec.layers)
        if tail_start <= head_end:
            raise ValueError(
                f"the trunk would be empty: tail_cut ({value!r}) must come after cut ({cut!r}); "
                f"allowed: {', '.join(spec.layers[head_end : len(spec.layers) - 1])}"
            )
        return value

    @field_validator("shared", "private")
    @classmethod
    def _patterns_match(cls, patterns: list[str] | None, info: ValidationInfo) -> list[str] | None:
        spec = info.data.get("model")
        if patterns is not None and spec is not None:
            _expand(patterns, spec)
        return patterns

    @model_validator(mode="after")
    def _resolve(self) -> SplitPlan:
        layers = self.model.layers
        head_end = _cut_position(self.cut, layers)
        tail_start = len(layers) if self.tail_cut is None else _cut_position(self.tail_cut, layers)
        self._head, self._trunk, self._tail = (
            layers[:head_end],
            layers[head_end:tail_start],
            layers[tail_start:],
        )
        private = _expand(self.private, self.model)
        if self.shared is None:
            shared = set(self.model.state_keys) - private
        else:
            shared = _expand(self.shared, self.model)
            both = sorted(shared & private)
            if both:
                raise ValueError(
                    f"shared/private: {len(both)} parameter(s) are both shared and private, "
                    f"e.g. {', '.join(both[:3])}"
                )
            neither = sorted(set(self.model.state_keys) - shared - private)
            if neither:
                raise ValueError(
                    f"shared/private: {len(neither)} parameter(s) are neither shared nor private, "
                    f"e.g. {', '.join(neither[:3])}; list them or omit 'shared'"
                )
        self._shared_keys, self._private_keys = frozenset(shared), frozenset(private)
        return self

    # -- resolved views -------------------------------------------------------------------------

    @property
    def head(self) -> tuple[str, ...]:
        return self._head

    @property
    def trunk(self) -> tuple[str, ...]:
        return self._trunk

    @property
    def tail(self) -> tuple[str, ...]:
        """Empty for vanilla split learning."""
        return self._tail

    @property
    def u_shaped(self) -> bool:
        return bool(self._tail)

    @property
    def shared_keys(self) -> frozenset[str]:
        return self._shared_keys

    @property
    def private_keys(self) -> frozenset[str]:
        return self._private_keys

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "<plan>") -> SplitPlan:
        return validate(cls, data, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SplitPlan:
        return cls.from_mapping(load_yaml_mapping(path), str(path))


def load_plan(name_or_path: str | Path) -> SplitPlan:
    """A plan from a YAML path, or one of the built-in plans by name (``cnn-u``)."""
    path = Path(name_or_path)
    if not path.exists() and str(name_or_path) in builtin_plan_names():
        path = BUILTIN_PLANS_DIR / f"{name_or_path}.yaml"
    elif not path.exists():
        raise ConfigError(
            str(name_or_path),
            [("", f"no such file, and not a built-in plan ({', '.join(builtin_plan_names())})")],
        )
    return SplitPlan.from_yaml(path)
