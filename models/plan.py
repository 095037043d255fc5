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
import json
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

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
    """The network: a registered architecture (``name``) or a factory of the user's own
    (``factory: "package.module:function"``), its arguments, and optionally its weights.

    Built-in architectures are sequences of named blocks and are cut between blocks; catalogue
    entries and factories are traced with ``torch.fx`` and cut after named modules
    (``models.graph_split``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, description="a built-in or catalogue architecture")
    factory: str | None = Field(
        None, description='"package.module:function" returning an nn.Module (sites must allow it)'
    )
    args: dict[str, Any] = Field(default_factory=dict)
    input_shape: tuple[int, ...] = Field(
        (),
        description="one sample's shape, without the batch axis (required with factory; "
        "derived from an architecture's args)",
    )
    weights: Path | None = Field(
        None, description="a local state dict (safetensors, or torch weights_only) to start from"
    )
    weights_sha256: str | None = Field(
        None, description="the weights file's digest; filled in from the file when left out"
    )
    leaf_modules: tuple[str, ...] = Field(
        (), description="module classes (package.module.Class) traced as one call, not entered"
    )

    _layers: tuple[str, ...] = PrivateAttr(default=())
    _positions: dict[str, int] = PrivateAttr(default_factory=dict)
    _modules: frozenset[str] = PrivateAttr(default=frozenset())
    _state_keys: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("name")
    @classmethod
    def _known_architecture(cls, name: str | None) -> str | None:
        if name is not None and name not in _registry().names():
            raise ValueError(
                f"unknown architecture {name!r}; allowed: {', '.join(_registry().names())}"
            )
        return name

    @field_validator("factory")
    @classmethod
    def _allowed_factory(cls, factory: str | None, info: ValidationInfo) -> str | None:
        """Checked before anything is imported: a site imports only what it allows."""
        if factory is None:
            return None
        from models.factory import FACTORY_PATTERN, check_allowed  # noqa: PLC0415

        if not FACTORY_PATTERN.match(factory):
            raise ValueError(f"{factory!r} is not of the form package.module:function")
        allow = (info.context or {}).get("allow_factories")
        check_allowed(factory, allow)
        return factory

    @field_validator("args")
    @classmethod
    def _valid_args(cls, args: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is None:
            return args  # a factory's own signature checks them when it is called
        try:
            parsed = _registry().get(name).parse_args(args)
        except ValidationError as exc:
            details = "; ".join(_described(e) for e in exc.errors(include_url=False))
            raise ValueError(f"invalid arguments for {name!r}: {details}") from None
        dumped: dict[str, Any] = parsed.model_dump()
        return dumped

    @model_validator(mode="after")
    def _describe_structure(self) -> ModelSpec:
        if (self.name is None) == (self.factory is None):
            raise ValueError("give exactly one of name (an architecture) or factory")
        if self.factory is not None and not self.input_shape:
            raise ValueError("input_shape: required with factory (one sample's shape)")
        if self.name is not None:
            derived = tuple(_registry().get(self.name).input_shape(self.args))
            if self.input_shape and tuple(self.input_shape) != derived:
                raise ValueError(
                    f"input_shape: {list(self.input_shape)} contradicts {self.name}'s args, "
                    f"which give {list(derived)}"
                )
            object.__setattr__(self, "input_shape", derived)
        if self.weights is not None:
            self._check_weights_digest()
        # Built on the meta device: names and shapes only, no memory for weights.
        with _torch().device("meta"):
            model = self.build()
        if self.traced:
            from models.graph_split import cut_candidates, traced_modules  # noqa: PLC0415

            self._positions = cut_candidates(model)  # type: ignore[arg-type]
            self._modules = frozenset(traced_modules(model))  # type: ignore[arg-type]
            self._layers = tuple(self._positions)
        else:
            self._layers = tuple(model._modules)
            self._positions = {name: i for i, name in enumerate(self._layers)}
        self._state_keys = tuple(model.state_dict())
        return self

    def _check_weights_digest(self) -> None:
        import hashlib  # noqa: PLC0415

        assert self.weights is not None
        try:
            digest = hashlib.sha256(self.weights.read_bytes()).hexdigest()
        except OSError as exc:
            raise ValueError(f"weights: cannot read {self.weights} ({exc.strerror})") from None
        if self.weights_sha256 is None:
            object.__setattr__(self, "weights_sha256", digest)
        elif digest != self.weights_sha256:
            raise ValueError(
                f"weights: {self.weights} is not the file the job names (sha256 {digest[:12]}..., "
                f"expected {self.weights_sha256[:12]}...)"
            )

    @property
    def traced(self) -> bool:
        """Cut after module names of a traced graph, rather than between top-level blocks."""
        return self.factory is not None or bool(
            self.name is not None and _registry().get(self.name).traced
        )

    @property
    def default_cuts(self) -> tuple[str, str] | None:
        if self.name is None:
            return None
        cuts: tuple[str, str] | None = _registry().get(self.name).cuts
        return cuts

    @property
    def layers(self) -> tuple[str, ...]:
        """Where the model may be cut, in forward order: top-level block names, or for a traced
        network the modules after which exactly one tensor crosses."""
        return self._layers

    @property
    def state_keys(self) -> tuple[str, ...]:
        """Every state-dict key of the full model (parameters and buffers)."""
        return self._state_keys

    def runs(self, module: str) -> bool:
        """Whether a traced network runs ``module`` (a cut candidate or not)."""
        return module in self._modules

    def position(self, cut: str | int) -> int:
        """Where a cut falls in forward order (two module names may end at the same place)."""
        name = cut if isinstance(cut, str) else self._layers[cut - 1]
        return self._positions[name]

    def build(self, seed: int | None = None) -> torch.nn.Module:
        """The model; with ``seed``, initialised exactly as ``torch.manual_seed(seed)`` would.

        Seeded builds leave the global generator alone. Every build holds one lock: a build
        draws its initial weights from the global generator, so an unseeded build running
        while a seeded one is half done would draw from (and advance) the seeded stream, and
        parties of one job built at once in one process (threads, in tests and experiments)
        would start from different weights now and then. A traced network comes back as its
        ``torch.fx`` graph module, holding only the tensors its forward uses, under their
        original names (traced once per architecture: ``graph_split.as_graph_module``).
        """
        if seed is None:  # the global generator, as the caller left it; still one at a time
            with _BUILD_LOCK:
                return self._build()
        with _BUILD_LOCK, _torch().random.fork_rng(devices=[]):
            _torch().manual_seed(seed)
            return self._build()

    def _build(self) -> torch.nn.Module:
        if self.factory is not None:
            from models.factory import call_factory  # noqa: PLC0415

            model = call_factory(self.factory, self.args)
        else:
            assert self.name is not None
            model = _registry().build(self.name, self.args)
        if self.weights is not None:
            from models.factory import load_weights  # noqa: PLC0415

            load_weights(model, self.weights)
        if not self.traced:
            return model
        from models import graph_split  # noqa: PLC0415

        leaves = graph_split.leaf_classes((*graph_split.DEFAULT_LEAVES, *self.leaf_modules))
        key = json.dumps(
            [
                self.name,
                self.factory,
                self.args,
                [f"{c.__module__}.{c.__qualname__}" for c in leaves],
            ],
            sort_keys=True,
            default=str,
        )
        return graph_split.as_graph_module(model, leaves, key)


_BUILD_LOCK = threading.RLock()


def _described(error: Any) -> str:
    """One pydantic error as a line: its field and message (a check of the whole arguments
    names its own fields)."""
    place = ".".join(str(p) for p in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{place}: {message}" if place else message


def _cut_position(value: str | int, spec: ModelSpec) -> int:
    """Number of cut candidates up to and including the cut; raises ValueError naming the
    allowed values. Blocks of a built-in model: a cut after the last one leaves nothing."""
    cuttable = spec.layers if spec.traced else spec.layers[:-1]
    allowed = _listing(cuttable)
    if isinstance(value, int):
        if not 1 <= value <= len(cuttable):
            raise ValueError(
                f"cut {value} is out of range; this model allows 1..{len(cuttable)}, or a "
                f"{'module' if spec.traced else 'block'} name: {allowed}"
            )
        return value
    if value not in spec.layers and spec.runs(value):
        raise ValueError(
            f"cannot cut after {value!r}: more than one tensor crosses there (a skip "
            f"connection or concatenation around it), or it runs more than once; allowed: "
            f"{allowed}"
        )
    if value not in spec.layers:
        raise ValueError(f"unknown layer {value!r}; allowed: {allowed}")
    if value not in cuttable:
        raise ValueError(
            f"a cut after the last block {value!r} leaves an empty segment; allowed: {allowed}"
        )
    return spec.layers.index(value) + 1


def _listing(names: tuple[str, ...], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all: medsplit plan)"


def _expand(patterns: list[str], spec: ModelSpec) -> set[str]:
    """State-dict keys selected by block names or shell patterns; unknown entries are refused."""
    selected: set[str] = set()
    for pattern in patterns:
        # A module's name selects everything in it; anything else is a shell pattern.
        hits = {k for k in spec.state_keys if k.startswith(pattern + ".")}
        hits |= {k for k in spec.state_keys if fnmatch.fnmatchcase(k, pattern)}
        if not hits:
            raise ValueError(
                f"{pattern!r} matches no layer or parameter; layers: {_listing(spec.layers)}"
            )
        selected |= hits
    return selected


class SplitPlan(BaseModel):
    """Which blocks run where, and which tensors are shared or private. See module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelSpec
    cut: str | int | None = Field(
        None,
        description="the head ends after this block or module (name or count); a catalogue "
        "network may leave it out for its default cuts",
    )
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
    _segment_keys: tuple[tuple[str, ...], ...] = PrivateAttr(default=())

    @field_validator("cut")
    @classmethod
    def _valid_cut(cls, value: str | int | None, info: ValidationInfo) -> str | int | None:
        spec = info.data.get("model")
        if spec is not None and value is not None:
            _cut_position(value, spec)
        return value

    @field_validator("tail_cut")
    @classmethod
    def _valid_tail_cut(cls, value: str | int | None, info: ValidationInfo) -> str | int | None:
        spec, cut = info.data.get("model"), info.data.get("cut")
        if value is None or spec is None or cut is None:
            return value
        head_end = _cut_position(cut, spec)
        tail_start = _cut_position(value, spec)
        if spec.position(tail_start) <= spec.position(head_end):
            later = tuple(n for n in spec.layers if spec.position(n) > spec.position(head_end))
            raise ValueError(
                f"the trunk would be empty: tail_cut ({value!r}) must come after cut ({cut!r}); "
                f"allowed: {_listing(later if spec.traced else later[:-1])}"
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
        if self.cut is None:
            defaults = self.model.default_cuts
            if defaults is None:
                raise ValueError(f"cut: required; allowed: {_listing(self.model.layers)}")
            object.__setattr__(self, "cut", defaults[0])
            object.__setattr__(self, "tail_cut", defaults[1])
        assert self.cut is not None
        layers = self.model.layers
        head_end = _cut_position(self.cut, self.model)
        tail_start = (
            len(layers) if self.tail_cut is None else _cut_position(self.tail_cut, self.model)
        )
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
        self._segment_keys = self._split_keys()
        return self

    def _split_keys(self) -> tuple[tuple[str, ...], ...]:
        """Head, trunk and tail keys, from cutting the model's meta-device build (tied weights
        across a cut are refused here)."""
        from models.split import split_model  # noqa: PLC0415

        # Built again rather than kept on the ModelSpec: private attributes take part in
        # pydantic's equality, which a module object would break (spec == spec).
        with _torch().device("meta"):
            parts = split_model(self.model.build(), self)
        return tuple(tuple(keys) for keys in parts.segment_keys())

    # -- resolved views -------------------------------------------------------------------------

    @property
    def head(self) -> tuple[str, ...]:
        return self._head

    @property
    def trunk(self) -> tuple[str, ...]:
        return self._trunk

    @property
    def tail(self) -> tuple[str, ...]:
        """Empty for vanilla split learning (and for a traced network cut after its last
        candidate: its tail is then the operations after that module)."""
        return self._tail

    @property
    def u_shaped(self) -> bool:
        return self.tail_cut is not None

    @property
    def cuts(self) -> list[str]:
        """The cuts as module (or block) names, in forward order."""
        cuts = [self.cut] if self.tail_cut is None else [self.cut, self.tail_cut]
        return [
            c if isinstance(c, str) else self.model.layers[c - 1] for c in cuts if c is not None
        ]

    @property
    def head_keys(self) -> tuple[str, ...]:
        return self._segment_keys[0]

    @property
    def trunk_keys(self) -> tuple[str, ...]:
        return self._segment_keys[1]

    @property
    def tail_keys(self) -> tuple[str, ...]:
        return self._segment_keys[2]

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
