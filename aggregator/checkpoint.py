"""The aggregator's checkpoints: one file per closed round, the newest ``keep`` kept.

A checkpoint is a ``ResumePoint`` (the job between two rounds: global weights, the finished
rounds, the normalisation, the site registry) plus the trunk and every optimizer state, and the
torch random state, written through ``medsplit.snapshots`` (safetensors and JSON, never pickle;
atomic and durable; checksummed). ``round-00003.safetensors`` resumes at round 3 (0-based):
rounds 0-2 are done.

On start, ``newest`` walks the files newest first and returns the first that reads back whole;
a torn or damaged one is skipped with a log line naming it. A checkpoint of another job (other
sites, mode, model or seed: its *fingerprint* differs) is refused with ``CheckpointMismatch``:
the operator must say ``--fresh`` to start over.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from aggregator.config import JobConfig
from aggregator.state import ResumePoint, RoundRecord, SiteEntry
from medsplit.snapshots import SnapshotError, dump, read, rng_states

log = logging.getLogger(__name__)

NAME = re.compile(r"^round-(\d{5,})(?:-turn-(\d{4,})-step-(\d{7,}))?\.safetensors$")


class CheckpointMismatch(RuntimeError):
    """The checkpoint directory holds another job's state."""


@dataclass(frozen=True)
class Loaded:
    """A checkpoint read back: the resume point, the trunk's part, and where it came from."""

    point: ResumePoint
    trunk_tensors: dict[str, torch.Tensor]
    trunk_document: dict[str, Any]
    rng: dict[str, torch.Tensor]  # rng_states(): the CPU's and each CUDA device's
    path: Path


def fingerprint(config: JobConfig) -> dict[str, Any]:
    """What must not change between a checkpoint and the job resuming from it."""
    return {
        "job_id": config.job_id,
        "mode": str(config.mode),
        "orchestration": str(config.orchestration),
        "sites": list(config.sites),
        "seed": config.seed,
        "plan": config.plan.model_dump(mode="json"),
        "training": config.training.model_dump(mode="json"),
    }


class CheckpointStore:
    def __init__(self, directory: Path, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def paths(self) -> list[Path]:
        """Checkpoint files, newest first (by round, then turn and step inside a round)."""
        if not self.directory.is_dir():
            return []
        found = [
            ((int(m[1]), int(m[2] or 0), int(m[3] or 0), m[2] is not None), p)
            for p in self.directory.iterdir()
            if (m := NAME.match(p.name))
        ]
        return [p for _, p in sorted(found, reverse=True)]

    def save(
        self,
        point: ResumePoint,
        config: JobConfig,
        trunk: tuple[dict[str, torch.Tensor], dict[str, object]] | None,
    ) -> Path:
        tensors = {f"weights/{k}": v for k, v in point.weights.items()}
        if point.normalization is not None:
            tensors["normalization/mean"], tensors["normalization/std"] = point.normalization
        if point.class_weights is not None:
            tensors["normalization/class_weights"] = point.class_weights
        tensors |= rng_states()
        trunk_doc: dict[str, object] = {}
        if trunk is not None:
            tensors |= trunk[0]
            trunk_doc = trunk[1]
        document = {
            "fingerprint": fingerprint(config),
            "round": point.round,
            "history": [asdict(r) for r in point.history],
            "sites": {s: asdict(e) for s, e in point.sites.items()},
            "late_messages": point.late_messages,
            "resumed_at": list(point.resumed_at),
            "turn": point.turn,
            "step": point.step,
            "record": None if point.record is None else asdict(point.record),
            "trunk": trunk_doc,
        }
        path = self.directory / f"{point.name}.safetensors"
        dump(path, tensors, document)
        self._prune()
        return path

    def newest(self, config: JobConfig) -> Loaded | None:
        """The newest checkpoint that reads back whole; None when there is none."""
        for path in self.paths():
            try:
                tensors, document = read(path)
                loaded = _loaded(path, tensors, document)
            except (SnapshotError, KeyError, TypeError, ValueError) as exc:
                log.warning("skipping checkpoint %s: %s", path, exc)
                continue
            if document.get("fingerprint") != fingerprint(config):
                raise CheckpointMismatch(
                    f"{path} belongs to another job definition (sites, mode, plan, seed or "
                    "training settings differ); start with --fresh to discard it"
                )
            return loaded
        return None

    def _prune(self) -> None:
        for old in self.paths()[self.keep :]:
            try:
                old.unlink()
            except OSError as exc:
                log.warning("could not remove old checkpoint %s: %s", old, exc)


def _loaded(path: Path, tensors: dict[str, torch.Tensor], document: dict[str, Any]) -> Loaded:
    weights = {
        k.removeprefix("weights/"): v for k, v in tensors.items() if k.startswith("weights/")
    }
    normalization = None
    if "normalization/mean" in tensors:
        normalization = (tensors["normalization/mean"], tensors["normalization/std"])
    point = ResumePoint(
        round=int(document["round"]),
        weights=weights,
        history=tuple(_record(r) for r in document["history"]),
        normalization=normalization,
        sites={s: _site(e) for s, e in document["sites"].items()},
        late_messages=int(document["late_messages"]),
        class_weights=tensors.get("normalization/class_weights"),
        resumed_at=tuple(int(r) for r in document.get("resumed_at", [])),
        turn=int(document.get("turn", 0)),
        step=int(document.get("step", 0)),
        record=None if document.get("record") is None else _record(document["record"]),
    )
    trunk = {k: v for k, v in tensors.items() if k.startswith("trunk")}
    rng = {k: v for k, v in tensors.items() if k.startswith("rng/")}
    return Loaded(point, trunk, dict(document.get("trunk") or {}), rng, path)


def _record(data: Mapping[str, Any]) -> RoundRecord:
    return RoundRecord(**{**data, "missed": list(data["missed"]), "trained": list(data["trained"])})


def _site(data: Mapping[str, Any]) -> SiteEntry:
    return SiteEntry(**{**data, "past_incarnations": tuple(data.get("past_incarnations", ()))})
