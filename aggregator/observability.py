"""What the aggregator shows of a running job: the ``/status`` model and ``/metrics``.

Both are read from the coordinator's ``JobState`` -- one immutable value, replaced at every
transition -- so the HTTP thread reads a consistent snapshot without locks, and neither adds
any bookkeeping to the job: counters are what the state and the channel already count.
Rounds are numbered from 0, as in report.json.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Any

from aggregator.state import Phase, SiteEntry
from medsplit.metric_families import Scraped, counted_by, one_hot

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from aggregator.coordinator import Coordinator

# Upper bounds of the round-duration histogram, seconds: a tabular round takes well under a
# second on a laptop, an image round over a WAN minutes.
ROUND_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


def site_state(phase: Phase, entry: SiteEntry, waiting: Collection[str]) -> str:
    """One word for the status page: revoked, not joined, offline, finished, working, idle.
    ``waiting``: whom the job waits for (``JobState.waiting_for``, computed once per page)."""
    if entry.revoked:
        return "revoked"
    if entry.finished:  # has its final model (and may have left since)
        return "finished"
    if not entry.joined:
        return "not joined"
    if not entry.connected:
        return "offline"
    if entry.site_id in waiting:
        return {Phase.EVALUATING: "evaluating", Phase.STATISTICS: "statistics"}.get(
            phase, "training"
        )
    return "idle"


def status(coordinator: Coordinator) -> dict[str, Any]:
    """``/status``: the job, its phase and round, each site, and every closed round."""
    state, config = coordinator.state, coordinator.config
    last = state.history[-1] if state.history else None
    waiting = state.waiting_for
    asked = set(waiting)
    return {
        "job_id": config.job_id,
        "mode": str(config.mode),
        "orchestration": str(config.orchestration),
        "phase": str(state.phase),
        "round": state.round,
        "rounds": config.rounds.count,
        "rounds_completed": len(state.history),
        "waiting_for": waiting,
        "sites": {
            site: {
                "state": site_state(state.phase, entry, asked),
                "joined": entry.joined,
                "connected": entry.connected,
                "last_seen_s_ago": None
                if entry.last_seen is None
                else round(coordinator.clock() - entry.last_seen, 1),
                "train_samples": entry.train_samples,
                "test_samples": entry.test_samples,
                "bytes": {"up": entry.bytes_up, "down": entry.bytes_down},
                "last_metrics": dict(last.metrics.get(site, {})) if last else {},
            }
            for site, entry in state.sites.items()
        },
        "history": [
            {
                "round": record.round,
                "mean": record.mean(),
                "sites": {s: dict(m) for s, m in record.metrics.items()},
                "train_loss": dict(record.train_loss),
                "seconds": record.seconds,
                "missed": list(record.missed),
            }
            for record in state.history
        ],
        "late_messages": state.late_messages,
        "rejected": dict(coordinator.endpoint.stats.rejected),
        "last_checkpoint": None
        if coordinator.last_checkpoint is None
        else str(coordinator.last_checkpoint),
    }


class JobCollector(Scraped["Coordinator"]):
    """Prometheus metrics of the job, computed from the state when scraped."""

    def families(self, coordinator: Coordinator) -> Iterator[Metric]:
        from prometheus_client.core import (  # noqa: PLC0415 (only when metrics are served)
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        state = coordinator.state
        yield GaugeMetricFamily("medsplit_round", "current round, from 0", value=state.round)
        phases = [str(p) for p in Phase]
        yield one_hot("medsplit_phase", "1 for the job's phase", "phase", phases, str(state.phase))
        yield CounterMetricFamily(
            "medsplit_rounds_completed", "rounds closed", value=len(state.history)
        )
        seconds = [record.seconds for record in state.history]
        yield HistogramMetricFamily(
            "medsplit_round_seconds",
            "wall time of each closed round (training and evaluation)",
            buckets=[
                *((str(b), sum(s <= b for s in seconds)) for b in ROUND_BUCKETS),
                ("+Inf", len(seconds)),
            ],
            sum_value=sum(seconds),
        )
        traffic = CounterMetricFamily(
            "medsplit_site_bytes",
            "wire bytes by site and direction, as each site counts them",
            labels=["site", "direction"],
        )
        for site, entry in state.sites.items():
            traffic.add_metric([site, "up"], entry.bytes_up)
            traffic.add_metric([site, "down"], entry.bytes_down)
        yield traffic
        wire = CounterMetricFamily(
            "medsplit_bytes",
            "wire bytes the aggregator sent and received, by site (all: broadcasts), direction "
            "and message kind",
            labels=["site", "direction", "kind"],
        )
        for (site, direction, kind), count in dict(coordinator.endpoint.stats.traffic).items():
            wire.add_metric([site, direction, kind], count)
        yield wire
        yield counted_by(
            "medsplit_messages_rejected",
            "messages refused, by reason",
            "reason",
            coordinator.endpoint.stats.rejected,
        )
        yield CounterMetricFamily(
            "medsplit_late_messages",
            "replies for a closed step, dropped",
            value=state.late_messages,
        )
        sites = GaugeMetricFamily("medsplit_sites", "sites by registry state", labels=["state"])
        sites.add_metric(["joined"], len(state.joined))
        sites.add_metric(["connected"], len(state.live))
        yield sites
        if coordinator.last_checkpoint is not None:
            try:
                age = time.time() - coordinator.last_checkpoint.stat().st_mtime
            except OSError:
                return  # rotated away between the save and this scrape
            yield GaugeMetricFamily(
                "medsplit_seconds_since_checkpoint", "age of the newest checkpoint", value=age
            )
