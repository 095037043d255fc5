"""The order of a vertical job's private set intersection, as the aggregator relays it.

The parties find the patients they share with OpenMined's PSI (``edge_agent.alignment``: the
label party is the client, each other party in turn the server). They cannot reach each other,
only the aggregator, so the aggregator runs the exchanges as a script of stages, each one
request per party asked, carrying the bytes of the previous stage's answers to the next:

1. for each other party P, in plan order:
   ``ask`` (label party: its remaining keys, blinded) -> ``serve`` (P: its keys blinded, and the
   label party's blinded again) -> ``narrow`` (label party: keeps the keys P holds too);
2. ``common`` (label party: the common keys, salted and hashed, encrypted for the parties);
3. ``adopt`` (every other party, at once: its rows of the common keys).

What the aggregator sees: blinded group elements, set sizes, and the common keys encrypted
under a key derived from the parties' secret -- never an identifier, nor a salted key. The stages are
pure functions of the job state, like the rest of ``aggregator.state``; a stage that misses its
deadline, or a party that cannot align (no patient in common, a key column missing or
repeated), ends the job before training, with the party's own words.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch

from medsplit.protocol import Kind
from medsplit.protocol.meta import AlignStage
from medsplit.protocol.spec import PSI_TENSORS

if TYPE_CHECKING:
    from aggregator.state import JobState, Send, Tensors


class Aligning(Protocol):
    """A party's side of the stages (``edge_agent.alignment.PartyAlignment``)."""

    def answer(
        self, stage: AlignStage, partner: str | None, asking: int, tensors: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], int | None]: ...


@dataclass(frozen=True)
class AlignAsk:
    """One party's request in a stage of the alignment."""

    site: str
    stage: AlignStage
    partner: str | None = None  # ask / serve / narrow: the other party of this intersection


@dataclass(frozen=True)
class AlignReplied:
    """A party's answer to its stage: PSI bytes, and a set size where the stage has one."""

    site: str
    tensors: Tensors
    size: int | None = None


Script = tuple[tuple[AlignAsk, ...], ...]


def alignment_script(parties: tuple[str, ...], label_party: str) -> Script:
    """The stages of the alignment of ``parties`` (see the module docstring)."""
    others = [p for p in parties if p != label_party]
    stages: list[tuple[AlignAsk, ...]] = []
    for party in others:
        stages.append((AlignAsk(label_party, "ask", party),))
        stages.append((AlignAsk(party, "serve", label_party),))
        stages.append((AlignAsk(label_party, "narrow", party),))
    stages.append((AlignAsk(label_party, "common"),))
    stages.append(tuple(AlignAsk(party, "adopt") for party in others))
    return tuple(stages)


def start_stage(
    state: JobState, script: Script, stage: int, now: float, deadline_s: float
) -> JobState:
    """Ask the parties of ``stage``; the answers of the stage before are carried in ``state``."""
    from aggregator.state import Phase  # noqa: PLC0415 -- state imports this module

    asked = tuple(ask.site for ask in script[stage])
    return replace(
        state,
        phase=Phase.ALIGNING,
        align_stage=stage,
        asked=asked,
        aligned={},
        refused=(),
        deadline=now + deadline_s,
    )


def stage_request(state: JobState, script: Script, site: str) -> Send:
    """What ``site`` is asked in the current stage, with the bytes it needs."""
    from aggregator.state import Send  # noqa: PLC0415

    ask = next(a for a in script[state.align_stage] if a.site == site)
    meta: dict[str, object] = {"stage": ask.stage}
    if ask.partner is not None:
        meta["partner"] = ask.partner
    if ask.stage == "serve":
        meta["asking"] = state.align_size or 0
    empty = torch.zeros(0, dtype=torch.uint8)
    tensors = {name: state.align_carry.get(name, empty) for name in PSI_TENSORS}
    # The stage is the request's round: each stage a request of its own, not a repeat.
    return Send(site, Kind.ALIGN, state.align_stage, tensors, meta)


def replied(state: JobState, answer: AlignReplied) -> JobState:
    from aggregator.state import Phase  # noqa: PLC0415

    if state.phase != Phase.ALIGNING or answer.site not in state.waiting_for:
        return replace(state, late_messages=state.late_messages + 1)
    return replace(state, aligned={**state.aligned, answer.site: answer})


def close_stage(state: JobState) -> tuple[JobState, str | None]:
    """The stage's answers carried on (a failure's reason instead when one is missing)."""
    missing = state.waiting_for
    if missing:
        return state, (
            f"the alignment (private set intersection) got no answer from "
            f"{', '.join(missing)} before its deadline"
        )
    carry: dict[str, torch.Tensor] = {}
    size = state.align_size
    for answer in state.aligned.values():
        carry |= {k: v for k, v in answer.tensors.items() if v.numel()}
        size = answer.size if answer.size is not None else size
    return replace(state, align_carry=carry, align_size=size, aligned={}, asked=()), None


def relay_in_process(sides: Mapping[str, Aligning], label_party: str) -> int:
    """Run the whole script between parties held in one process, carrying each stage's bytes
    to the next as the aggregator does; returns the bytes relayed. For tests and benchmarks:
    a job relays through the aggregator's state machine (``start_stage``)."""
    carry: dict[str, torch.Tensor] = {}
    size, relayed = 0, 0
    for stage in alignment_script(tuple(sides), label_party):
        answers = [
            sides[ask.site].answer(ask.stage, ask.partner, size, dict(carry)) for ask in stage
        ]
        carry = {k: v for tensors, _ in answers for k, v in tensors.items() if v.numel()}
        relayed += sum(v.numel() for v in carry.values())
        size = next((s for _, s in answers if s is not None), size)
    return relayed
