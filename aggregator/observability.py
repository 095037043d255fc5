"""What the aggregator shows of a running job: the ``/status`` model and ``/metrics``.

Both are read from the coordinator's ``JobState`` -- one immutable value, replaced at every
transition -- so the HTTP thread reads a consistent snapshot without locks, and neither adds
any bookkeeping to the job: counters are what the state and the channel already count.
Rounds are numbered from 0, as in report.json.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Any

from aggregator.state import JobState, Phase, SiteEntry
from aggregator.vertical import vertical_summary
from medsplit.metric_families import Durations, Scraped, counted_by, one_hot
from medsplit.modes import MODES
from medsplit.protocol import Kind
from medsplit.protocol.meta import StepMeta, read_meta

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from aggregator.coordinator import Coordinator
    from medsplit.wire import Envelope

# Upper bounds of the round-duration histogram, seconds: a tabular round takes well under a
# second on a laptop, an image round over a WAN minutes.
ROUND_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# Of one split-learning step: tens of milliseconds on loopback, seconds over a slow WAN.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# A round is late past this many times the median closed round, plus the grace.
LATE_FACTOR, LATE_GRACE_S = 2.0, 5.0
CUT_LAYER_KINDS = frozenset({Kind.ACTIVATIONS, Kind.TRUNK_GRAD, Kind.EVAL_ACTIVATIONS})


class StepTimes:
    """Split learning's steps as the aggregator sees them, for ``/metrics``.

    ``trunk``: the aggregator's own work per cut-layer message, by kind. ``step``: per site,
    from one training step's activations to the next step's -- the site's compute, both trips
    over the broker and the trunk's -- counted only between consecutive steps of one round, so
    evaluation and the gaps between turns do not count as slow steps.
    """

    def __init__(self) -> None:
        self.trunk = Durations(STEP_BUCKETS)
        self.step = Durations(STEP_BUCKETS)
        self._last: dict[str, tuple[int, int, float]] = {}  # site: round, step, when

    def served(self, site: str, env: Envelope, started: float, ended: float) -> None:
        """``env`` from ``site`` was handled between ``started`` and ``ended``."""
        self.trunk.observe(env.kind, ended - started)
        if env.kind != Kind.ACTIVATIONS or read_meta(StepMeta, env).micro:
            return  # a step is timed from its first micro-batch
        previous = self._last.get(site)
        if previous is not None and previous[:2] == (env.round, env.step - 1):
            self.step.observe(site, started - previous[2])
        self._last[site] = (env.round, env.step, started)


def site_state(
    phase: Phase, entry: SiteEntry, waiting: Collection[str], late: str | None = None
) -> str:
    """One word for the status page: revoked, not joined, offline, finished, late, working, idle.
    ``waiting``: whom the job waits for (``JobState.waiting_for``, computed once per page);
    ``late``: why the step those sites owe is overdue (``lateness``), None while it is not."""
    standing = (  # in this order: a revoked site that had finished is revoked
        ("revoked", entry.revoked),
        ("finished", entry.finished),  # has its final model (and may have left since)
        ("not joined", not entry.joined),
        ("offline", not entry.connected),
        ("idle", entry.site_id not in waiting),
        ("late", late is not None),
    )
    for word, applies in standing:
        if applies:
            return word
    return {Phase.EVALUATING: "evaluating", Phase.STATISTICS: "statistics"}.get(phase, "training")


def lateness(state: JobState, now: float, deadline_s: float) -> str | None:
    """Why the sites the round waits for are late, or None while the round is on time.

    Late means the round has run more than ``LATE_FACTOR`` times the median closed round (plus
    a grace for rounds of a second), or, before any round has closed, half its deadline: early
    enough to act before the deadline drops the site from the round.
    """
    if state.phase not in (Phase.TRAINING, Phase.EVALUATING) or state.record is None:
        return None
    running = now - state.round_started
    if state.history:
        typical = statistics.median(record.seconds for record in state.history)
        if running > LATE_FACTOR * typical + LATE_GRACE_S:
            return f"round {state.round} has run {running:.0f} s; rounds take {typical:.0f} s"
    elif running > deadline_s / 2:
        return f"round {state.round} has run {running:.0f} s of its {deadline_s:.0f} s deadline"
    return None


def _note(site: str, state_word: str, late: str | None, missed: Collection[str]) -> str:
    """A few words on why a site is in its state, for the table's last column."""
    if state_word == "late":
        return late or ""
    if site in missed:
        return "missed the last round"
    return ""


def status(coordinator: Coordinator) -> dict[str, Any]:
    """``/status``: the job, its phase and round, each site, and every closed round."""
    state, config = coordinator.state, coordinator.config
    last = state.history[-1] if state.history else None
    waiting = state.waiting_for
    asked = set(waiting)
    now = coordinator.clock()
    late = lateness(state, now, config.rounds.deadline_s)
    missed = set(last.missed) if last else set()
    words = {site: site_state(state.phase, e, asked, late) for site, e in state.sites.items()}
    return {
        "job_id": config.job_id,
        "mode": str(config.mode),
        "orchestration": str(config.orchestration),
        # Split modes: whether the sites' head and tail travel sealed (None: federated modes).
        "sealed_segments": coordinator.sealed if MODES[config.mode].weights == "edge" else None,
        "vertical": vertical_summary(config, state.align_size),
        "phase": str(state.phase),
        "round": state.round,
        "rounds": config.rounds.count,
        "rounds_completed": len(state.history),
        # The newest round's metrics of every site's held-out records together (from counts).
        "pooled": dict(last.pooled) if last else {},
        "waiting_for": waiting,
        "late": late,
        "sites": {
            site: {
                "state": words[site],
                "note": _note(site, words[site], late, missed),
                "joined": entry.joined,
                "connected": entry.connected,
                "last_seen_s_ago": None
                if entry.last_seen is None
                else round(now - entry.last_seen, 1),
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
                "pooled": dict(record.pooled),
                "sites": {s: dict(m) for s, m in record.metrics.items()},
                "train_loss": dict(record.train_loss),
                "seconds": record.seconds,
                "missed": list(record.missed),
            }
            for record in state.history
        ],
        "late_messages": state.late_messages,
        "rejected": dict(coordinator.endpoint.stats.rejected),
        "refused": dict(coordinator.conduct.refusals),
        "dropped_events": dict(coordinator.conduct.dropped_events),
        "last_checkpoint": None
        if coordinator.last_checkpoint is None
        else str(coordinator.last_checkpoint),
    }


def latest_epsilon(state: JobState) -> dict[str, float]:
    """Each site's epsilon in the newest round it reported one."""
    out: dict[str, float] = {}
    for record in state.history:
        for site, metrics in record.metrics.items():
            if isinstance(metrics.get("epsilon"), int | float):
                out[site] = float(metrics["epsilon"])
    return out


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
        late = lateness(state, coordinator.clock(), coordinator.config.rounds.deadline_s)
        yield GaugeMetricFamily(
            "medsplit_round_late",
            "1 while the round is overdue (the status page's 'late': over twice the median "
            "round plus 5 s, or half the deadline before any round closed)",
            value=0 if late is None else 1,
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
        steps = coordinator.step_times
        yield steps.step.family(
            "medsplit_step_seconds",
            "one split-learning training step, as the aggregator sees it: from a site's "
            "activations to its next step's",
            "site",
        )
        yield steps.trunk.family(
            "medsplit_trunk_seconds",
            "the aggregator's own work per cut-layer message, by message kind",
            "kind",
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
        yield counted_by(
            "medsplit_replies_refused",
            "answers a site owed that were refused (the site lost its step), by reason",
            "reason",
            coordinator.conduct.refusals,
        )
        yield counted_by(
            "medsplit_events_dropped",
            "events the job's state machine failed on, dropped so that the job goes on",
            "event",
            coordinator.conduct.dropped_events,
        )
        yield CounterMetricFamily(
            "medsplit_late_messages",
            "replies for a closed step, dropped",
            value=state.late_messages,
        )
        epsilon = GaugeMetricFamily(
            "medsplit_site_epsilon",
            "each site's epsilon so far, as it last reported it (its noise defenses' (epsilon, "
            "delta) from Opacus's accountant; absent when nothing it sends is accounted)",
            labels=["site"],
        )
        for site, value in latest_epsilon(state).items():
            epsilon.add_metric([site], value)
        yield epsilon
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
