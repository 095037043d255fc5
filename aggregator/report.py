"""The run directory: ``report.json``, the final weights, and the pages drawn from the report
(``curves.png`` and ``report.html``, in ``report_page``).

The report is the contract with users and with ``medsplit experiment``: mode, orchestration,
dataset, sites, per-site and mean metrics for every round, bytes each site sent and received,
and wall time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from aggregator.config import JobConfig
from aggregator.coordinator import Coordinator
from aggregator.report_page import write_pages
from aggregator.state import RoundRecord
from aggregator.vertical import vertical_summary
from medsplit.evaluation import NAMES as CLINICAL
from medsplit.modes import MODES
from medsplit.storage import atomic_write


def build_report(
    coordinator: Coordinator, wall_time_s: float, status: str = "completed"
) -> dict[str, Any]:
    traffic = {s: {"up": st.bytes_up, "down": st.bytes_down} for s, st in coordinator.sites.items()}
    report = report_dict(
        coordinator.config,
        coordinator.history,
        traffic,
        wall_time_s,
        status=status,
        late_messages=coordinator.late_messages,
    )
    state = coordinator.state
    report["faults"] = {
        # Rounds (0-based) at which an aggregator restarted from a checkpoint went on; the
        # round it went on from was run (again) by the restarted one.
        "resumed_at": list(state.resumed_at),
        "resumed_from": None if coordinator.resumed_from is None else str(coordinator.resumed_from),
        "requests_resent": coordinator.resent,
        "duplicates_dropped": coordinator.endpoint.stats.duplicates,
        # Bad messages by reason and by the topic branch (sender) they came on, messages the
        # inbox dropped from a flooding branch, error answers not sent (no amplification).
        "rejected": dict(coordinator.endpoint.stats.rejected),
        "rejected_from": dict(coordinator.endpoint.stats.rejected_from),
        "throttled": dict(coordinator.endpoint.transport.throttled),
        "error_replies_suppressed": sum(coordinator.error_replies.suppressed.values()),
        # Answers refused by the job's rules (by reason, and by site): the site lost its step.
        "refused": dict(coordinator.conduct.refusals),
        "refused_from": dict(coordinator.conduct.refused_from),
        # Events the state machine failed on, dropped so that the job could go on (a bug).
        "dropped_events": dict(coordinator.conduct.dropped_events),
        "requests_deferred": coordinator.requests.deferred,
        "revoked": [s for s, e in state.sites.items() if e.revoked],
        "unconfirmed_finish": [
            s for s, e in state.sites.items() if e.taking_part and not e.finished
        ],
    }
    # Split modes: whether the sites' head and tail travelled sealed (None: federated modes).
    # (None too in vertical jobs, whose parties' layers never travel at all.)
    report["sealed_segments"] = (
        coordinator.sealed if MODES[coordinator.config.mode].weights == "edge" else None
    )
    report["vertical"] = vertical_summary(coordinator.config, state.align_size)
    report["data_path"] = data_path(coordinator)
    report["wire_bytes"] = wire_bytes(coordinator)
    report["last_checkpoint"] = (
        None if coordinator.last_checkpoint is None else str(coordinator.last_checkpoint)
    )
    return report


def data_path(coordinator: Coordinator) -> dict[str, Any]:
    """The aggregator's side of every cut-layer step: its work per message kind (the trunk)
    and its codec time per operation and kind, over the whole job (bench/split_overhead.py)."""
    return {
        "trunk": {
            kind: {"count": count, "seconds": round(total, 4)}
            for kind, (count, total) in coordinator.step_times.trunk.totals().items()
        },
        "codec_seconds": {
            key: round(total, 4) for key, total in coordinator.endpoint.stats.codec_seconds.items()
        },
    }


def wire_bytes(coordinator: Coordinator) -> dict[str, dict[str, dict[str, int]]]:
    """The bytes the aggregator itself sent and received, by site (``all``: broadcasts),
    direction and message kind: what a site cost it, whatever the site reports."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for (site, direction, kind), count in sorted(coordinator.endpoint.stats.traffic.items()):
        out.setdefault(site, {}).setdefault(direction, {})[kind] = count
    return out


def report_dict(
    config: JobConfig,
    history: list[RoundRecord],
    traffic: dict[str, dict[str, int]],
    wall_time_s: float,
    *,
    status: str = "completed",
    late_messages: int = 0,
    mode: str | None = None,
) -> dict[str, Any]:
    """The report of any run; ``mode`` overrides the config's (for the network-free baselines)."""
    rounds = [_round(record) for record in history]
    return {
        "job_id": config.job_id,
        "status": status,
        "mode": mode or config.mode,
        "orchestration": "none" if mode in ("centralized", "local") else config.orchestration,
        "dataset": config.dataset,
        "model": config.plan.model.name,
        "sites": list(config.sites),
        "rounds": config.rounds.count,
        "local_epochs": config.training.local_epochs,
        "batch_size": config.training.batch_size,
        "wire_dtype": config.training.wire_dtype,
        "seed": config.seed,
        "history": rounds,
        "final": rounds[-1] if rounds else None,
        "bytes": traffic,
        "late_messages": late_messages,
        "wall_time_s": round(wall_time_s, 3),
    }


def _round(record: RoundRecord) -> dict[str, Any]:
    keep = ("loss", "accuracy", "auroc", *CLINICAL, "samples", "epsilon")
    return {
        "round": record.round,
        "seconds": round(record.seconds, 3),
        "train_seconds": round(record.train_seconds, 3),
        "mean": record.mean(),
        "pooled": record.pooled,
        "sites": {s: {k: m.get(k) for k in keep} for s, m in record.metrics.items()},
        "train_loss": record.train_loss,
        "compute_seconds": {s: round(v, 4) for s, v in record.compute_seconds.items()},
        "site_timings": {
            s: {k: round(v, 4) for k, v in t.items()} for s, t in record.site_timings.items()
        },
        "trained": record.trained,
        "missed": record.missed,
        "resumed": record.resumed,
        "bytes": record.bytes,
    }


def write_run(run_dir: Path, report: dict[str, Any], final_state: dict[str, torch.Tensor]) -> None:
    write_report(run_dir, report)
    weights = save({k: v.contiguous() for k, v in final_state.items()})
    atomic_write(run_dir / "model.safetensors", weights)
    write_pages(run_dir, report)


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "report.json", json.dumps(report, indent=2).encode())
