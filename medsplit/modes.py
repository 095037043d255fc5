"""One vocabulary for the methods medsplit runs, and one table of what each one means.

Everything that differs between modes -- which weights travel each round, whether cut-layer
tensors travel per batch, whether labels leave a site, how rounds are orchestrated by default --
is read from ``MODES`` rather than compared as strings across the code base. Adding a mode is
adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal, get_args


class TextEnum(str, Enum):
    """An enum whose members are their text: in f-strings, logs, JSON and YAML alike."""

    def __str__(self) -> str:
        return str(self.value)


class Mode(TextEnum):
    """How the network is divided between the sites and the aggregator (docs/index.md)."""

    SPLIT = "split"
    SPLIT_U = "split-u"
    FEDAVG = "fedavg"
    FLOP = "flop"
    VERTICAL = "vertical"


class Orchestration(TextEnum):
    """Sites take turns (sequential, cyclic) or train at the same time (parallel)."""

    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"


# Activations and gradients may travel down-cast (16-bit) or quantised with a scale per row
# (8-bit, medsplit.wire.quantize); weights always travel as float32.
WireDtype = Literal["float32", "float16", "bfloat16", "int8", "float8_e4m3fn"]
WIRE_DTYPES: tuple[str, ...] = get_args(WireDtype)

Exchanged = Literal["edge", "all", "shared", "none"]


@dataclass(frozen=True)
class ModeTraits:
    """What one mode exchanges and keeps.

    ``weights``: which state-dict entries travel in ``train``/``done`` -- the site's own
    segments (``edge``: head and tail), the whole model (``all``), or only the plan's shared
    tensors (``shared``; private layers never leave a site), or nothing (``none``: each party of
    a vertical job keeps its own head, which no other party could use).
    ``labels_travel`` None: as the plan says -- labels travel when it has no tail
    (``labels_travel``).
    """

    weights: Exchanged
    cut_layer: bool  # activations and gradients travel per batch
    labels_travel: bool | None
    u_shaped: bool | None  # the plan must (True) or must not (False) have a tail; None: either
    default_orchestration: Orchestration

    @property
    def federated(self) -> bool:
        return not self.cut_layer


MODES: dict[Mode, ModeTraits] = {
    Mode.SPLIT: ModeTraits("edge", True, True, False, Orchestration.SEQUENTIAL),
    Mode.SPLIT_U: ModeTraits("edge", True, False, True, Orchestration.SEQUENTIAL),
    Mode.FEDAVG: ModeTraits("all", False, False, None, Orchestration.PARALLEL),
    Mode.FLOP: ModeTraits("shared", False, False, None, Orchestration.PARALLEL),
    # Parties hold different columns of the same patients and step together (models.vertical).
    Mode.VERTICAL: ModeTraits("none", True, None, None, Orchestration.PARALLEL),
}


def traits(mode: Mode | str) -> ModeTraits:
    """The row of ``MODES`` for ``mode``; ValueError naming the allowed modes otherwise."""
    try:
        return MODES[Mode(mode)]
    except ValueError:
        allowed = ", ".join(m.value for m in Mode)
        raise ValueError(f"unknown mode {mode!r}; allowed: {allowed}") from None


def labels_travel(mode: Mode | str, u_shaped: bool) -> bool:
    """Whether labels leave the site that holds them, for a plan with (``u_shaped``) or
    without a tail: a vertical job's label party sends them only when the top is the
    aggregator's."""
    travel = traits(mode).labels_travel
    return not u_shaped if travel is None else travel


def gradients_tell_labels(mode: Mode | str, u_shaped: bool) -> bool:
    """Whether gradients that tell of the labels reach someone who does not hold them -- what
    ``defenses.gradient_noise`` blurs: in ``split-u`` the gradient a site returns for the
    trunk's output; in a vertical job, whichever the arrangement, the gradients the parties
    without labels get back. Where the labels themselves travel (``split``) there is nothing
    left to hide."""
    mode = Mode(mode)
    return mode == Mode.VERTICAL or (traits(mode).cut_layer and not labels_travel(mode, u_shaped))


SPLIT_MODES = tuple(m for m, t in MODES.items() if t.cut_layer)
FEDERATED_MODES = tuple(m for m, t in MODES.items() if t.federated)
