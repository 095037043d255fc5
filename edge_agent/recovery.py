"""What a site keeps so that a redone round, or a round resumed mid-way, is the round it would
have been: snapshots of its layers, optimizer and random state.

* Before training a round the site takes a **round snapshot** (in memory and, durably, in
  ``state.dir/resume.safetensors``, which after the round's training holds the state before
  the next round, so a site restarted between its turns goes on where it left off). Asked to train the same round again -- a restarted
  aggregator redoes the round it was killed in -- it starts from that snapshot instead of from
  the state the interrupted attempt left, so the redone round is bit for bit the round it
  would have been. A restarted agent reads the file back and has the same snapshot.
* In sequential split rounds with ``checkpoint.every_steps`` it also takes a **step snapshot**
  just before every N-th step (in memory; the last two are kept: the aggregator's newest step
  checkpoint is always one of them, since it writes it when that step's activations arrive).
  Asked to go on from step k, it restores snapshot k and carries on there.

Snapshots go through ``medsplit.snapshots`` (safetensors and JSON, never pickle, checksummed).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from edge_agent.local_model import LocalModel
from edge_agent.segments import EdgeSegments
from medsplit.snapshots import (
    SnapshotError,
    dump,
    load_optimizer,
    optimizer_tensors,
    read,
    rng_states,
    set_rng_states,
)

log = logging.getLogger(__name__)

RESUME_FILE = "resume.safetensors"  # the round snapshot of the round in training
KEPT_STEP_SNAPSHOTS = 2

Segments = EdgeSegments | LocalModel


@dataclass(frozen=True)
class Snapshot:
    """A site's layers, optimizer and random state before ``step`` of ``round`` (0: before the
    round), with its running loss at that point."""

    round: int
    step: int
    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, object]
    loss_sum: float = 0.0
    seen: int = 0
    tried: bool = True  # the round was (begun to be) trained from it


def take(
    segments: Segments, round: int, step: int = 0, loss_sum: float = 0.0, seen: int = 0
) -> Snapshot:
    model = {f"model/{k}": v.clone() for k, v in segments.full_state().items()}
    optimizer, document = optimizer_tensors(segments.optimizer, "optimizer")
    tensors = {**model, **optimizer, **rng_states(), **segments.amp.state()}
    return Snapshot(round, step, tensors, document, loss_sum, seen)


def restore(segments: Segments, snapshot: Snapshot) -> None:
    model = {
        k.removeprefix("model/"): v for k, v in snapshot.tensors.items() if k.startswith("model/")
    }
    modules: list[nn.Module] = (
        [segments.model] if isinstance(segments, LocalModel) else list(segments.modules())
    )
    for module in modules:
        module.load_state_dict({k: model[k] for k in module.state_dict()})
    load_optimizer(segments.optimizer, snapshot.tensors, snapshot.optimizer, "optimizer")
    set_rng_states(snapshot.tensors)
    segments.amp.load(snapshot.tensors)


class Recovery:
    """One site's snapshots in one job (see the module docstring)."""

    def __init__(self, site_id: str, job_id: str, state_dir: Path | None) -> None:
        self.site_id, self.job_id = site_id, job_id
        self.path = None if state_dir is None else state_dir / RESUME_FILE
        self.round: Snapshot | None = None
        self.steps: OrderedDict[tuple[int, int], Snapshot] = OrderedDict()
        self.redone_rounds: list[int] = []  # rounds trained again from their snapshot
        self.resumed_steps: list[tuple[int, int]] = []  # (round, step) gone on from
        self._on_disk: int | None = None  # the round whose starting state the file holds

    def before_round(self, segments: Segments, round: int) -> None:
        """Start a redone round from its snapshot; otherwise take one (and keep it on disk)."""
        if self.round is not None and self.round.round == round:
            restore(segments, self.round)
            if self.round.tried:
                self.steps = OrderedDict((k, s) for k, s in self.steps.items() if k[0] == round)
                self.redone_rounds.append(round)
                log.info(
                    "%s: round %d again: starting from this site's state before it",
                    self.site_id,
                    round,
                )
            self.round = replace(self.round, tried=True)
            return
        self.steps.clear()
        self.round = take(segments, round)
        if self._on_disk != round:  # after_round already wrote this state (same layers)
            self._persist(self.round)

    def after_round(self, segments: Segments, round: int) -> None:
        """The round is trained: on disk, this is now the state before the next one, so a
        site restarted between its turns starts the next round where it left off."""
        self._persist(take(segments, round + 1))

    def _persist(self, snapshot: Snapshot) -> None:
        if self.path is None:
            return
        self._on_disk = snapshot.round
        document = {"job_id": self.job_id, "site_id": self.site_id, "round": snapshot.round}
        try:
            dump(self.path, snapshot.tensors, {**document, "optimizer": snapshot.optimizer})
        except OSError as exc:  # the job goes on; only a restart of this site loses more
            log.error("%s: cannot write %s: %s", self.site_id, self.path, exc)

    def keep_step(
        self, segments: Segments, round: int, step: int, loss_sum: float, seen: int
    ) -> None:
        self.steps[(round, step)] = take(segments, round, step, loss_sum, seen)
        while len(self.steps) > KEPT_STEP_SNAPSHOTS:
            self.steps.popitem(last=False)

    def go_on_from(self, segments: Segments, round: int, step: int) -> Snapshot | None:
        """Asked to go on from ``step`` (a restarted aggregator's step checkpoint)."""
        if not step:
            return None
        snapshot = self.steps.get((round, step))
        if snapshot is None:
            log.warning(
                "%s: asked to go on from round %d step %d, but this site kept no state there; "
                "the round starts over",
                self.site_id,
                round,
                step,
            )
            return None
        restore(segments, snapshot)
        self.resumed_steps.append((round, step))
        log.info("%s: going on from round %d step %d", self.site_id, round, step)
        return snapshot

    def load(self, segments: Segments) -> None:
        """After a restart: the round snapshot of this job in the state directory, if any."""
        if self.path is None or not self.path.is_file():
            return
        try:
            tensors, document = read(self.path)
            if document.get("job_id") != self.job_id:
                return  # another job's state
            snapshot = Snapshot(
                int(document["round"]), 0, tensors, dict(document["optimizer"]), tried=False
            )
            restore(segments, snapshot)
        except (SnapshotError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            log.warning("%s: not resuming from %s: %s", self.site_id, self.path, exc)
            return
        self.round = snapshot
        log.info(
            "%s: restored this site's state from before round %d (%s)",
            self.site_id,
            snapshot.round,
            self.path,
        )
