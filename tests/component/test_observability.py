"""What /status and /metrics say of a job, read from the coordinator of a scripted job."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from aggregator.observability import JobCollector, lateness, site_state, status
from aggregator.report import build_report
from aggregator.state import JobState, Phase, RoundRecord, SiteEntry
from edge_agent.data import datasets
from edge_agent.observability import AgentCollector
from experiments.inprocess import JobResult, run_job
from medsplit.transport import MemoryBroker
from medsplit.wiring import memory_connector
from tests.support.configs import job_config
from tests.support.metrics import Samples, parse_samples

SITES = ["site-a", "site-b"]


@pytest.fixture(scope="module")
def job() -> JobResult:
    config = job_config(
        {
            "job_id": "seen",
            "plan": "mlp-ehr-u",
            "mode": "split-u",
            "orchestration": "sequential",
            "rounds": 2,
            "batch_size": 32,
            "sites": SITES,
        }
    )
    shares = datasets.all_sites(datasets.load("breast-cancer"), len(SITES), "iid", seed=0)
    logger = logging.getLogger("edge_agent.agent")
    previous = logger.level
    logger.addHandler(ROUND_LINES)
    logger.setLevel(logging.INFO)
    try:
        return run_job(
            config, dict(zip(SITES, shares, strict=True)), memory_connector(MemoryBroker())
        )
    finally:
        logger.removeHandler(ROUND_LINES)
        logger.setLevel(previous)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


ROUND_LINES = _Lines()


def _samples(job: JobResult, collector: object | None = None) -> Samples:
    registry = CollectorRegistry()
    registry.register(collector or JobCollector(lambda: job.coordinator))
    return parse_samples(generate_latest(registry).decode())


def test_the_metrics_agree_with_the_report(job: JobResult) -> None:
    report = build_report(job.coordinator, wall_time_s=1.0)
    samples = _samples(job)
    assert samples["medsplit_rounds_completed_total"][()] == len(report["history"]) == 2
    assert samples["medsplit_round"][()] == 1
    assert samples["medsplit_phase"][(("phase", "finished"),)] == 1
    assert samples["medsplit_phase"][(("phase", "training"),)] == 0
    for site, traffic in report["bytes"].items():
        for direction in ("up", "down"):
            key = (("direction", direction), ("site", site))
            assert samples["medsplit_site_bytes_total"][key] == traffic[direction] > 0
    wire = {
        tuple(v for _, v in key): count for key, count in samples["medsplit_bytes_total"].items()
    }
    stats = job.coordinator.endpoint.stats
    sent = sum(c for (direction, _, _), c in wire.items() if direction in {"down", "all"})
    assert sent == stats.sent_bytes  # every byte the aggregator published, by its topic
    received = sum(c for (direction, _, _), c in wire.items() if direction == "up")
    assert 0 < received <= stats.received_bytes  # presence is not job traffic
    kinds = {kind for (_, kind, _) in wire}
    # split-u: activations up, trunk output down, its gradient up, activation gradient down
    assert {"activations", "trunk-out", "trunk-grad", "act-grad", "train", "done"} <= kinds
    assert samples["medsplit_round_seconds_count"][()] == 2
    total = sum(r["seconds"] for r in report["history"])
    assert samples["medsplit_round_seconds_sum"][()] == pytest.approx(total, abs=0.01)  # report: ms
    assert samples["medsplit_late_messages_total"][()] == report["late_messages"]
    assert samples["medsplit_sites"][(("state", "joined"),)] == 2
    assert samples["medsplit_round_late"][()] == 0  # finished: nothing is overdue


def test_the_status_matches_the_registry_and_the_history(job: JobResult) -> None:
    shown = status(job.coordinator)
    assert (shown["job_id"], shown["phase"], shown["rounds_completed"]) == ("seen", "finished", 2)
    assert [r["round"] for r in shown["history"]] == [0, 1]  # one numbering, as in report.json
    registry = job.coordinator.sites
    for site in SITES:
        entry = shown["sites"][site]
        assert entry["state"] == "finished"
        assert entry["bytes"] == {"up": registry[site].bytes_up, "down": registry[site].bytes_down}
        assert entry["train_samples"] == registry[site].train_samples
        assert entry["last_metrics"] == job.history[-1].metrics[site]
    assert shown["history"][-1]["mean"] == job.history[-1].mean()


def test_each_site_gets_one_word_for_what_it_is_doing() -> None:
    sites = {
        "a": SiteEntry("a", joined=True, connected=True),
        "b": SiteEntry("b", joined=True, connected=True),
        "c": SiteEntry("c", joined=True, connected=False),
        "d": SiteEntry("d"),
        "e": SiteEntry("e", joined=True, connected=True, revoked=True),
    }
    state = JobState(Phase.TRAINING, sites, {}, deadline=0.0, round=0, asked=("a",))
    waiting = set(state.waiting_for)
    words = {site: site_state(state.phase, entry, waiting) for site, entry in sites.items()}
    assert words == {
        "a": "training",
        "b": "idle",
        "c": "offline",
        "d": "not joined",
        "e": "revoked",
    }
    evaluating = replace(state, phase=Phase.EVALUATING, asked=("a", "b"))
    waiting = set(evaluating.waiting_for)
    assert site_state(evaluating.phase, sites["b"], waiting) == "evaluating"


def test_split_steps_are_timed_per_site_and_per_message_kind(job: JobResult) -> None:
    samples = _samples(job)
    step_counts = samples["medsplit_step_seconds_count"]
    trunk_counts = samples["medsplit_trunk_seconds_count"]
    for site, agent in job.agents.items():
        per_round = -(-agent.data.train_samples // 32)
        # Between consecutive steps of a round only: the first step of each of 2 rounds opens it.
        assert step_counts[(("site", site),)] == 2 * (per_round - 1)
    steps = sum(-(-agent.data.train_samples // 32) * 2 for agent in job.agents.values())
    assert trunk_counts[(("kind", "activations"),)] == steps
    assert trunk_counts[(("kind", "trunk-grad"),)] == steps
    assert trunk_counts[(("kind", "eval-activations"),)] > 0
    buckets = samples["medsplit_step_seconds_bucket"]
    site = (("le", "+Inf"), ("site", SITES[0]))
    assert buckets[site] == step_counts[(("site", SITES[0]),)]  # cumulative up to +Inf


def test_the_report_says_where_each_split_step_went(job: JobResult) -> None:
    report = build_report(job.coordinator, wall_time_s=1.0)
    for record in report["history"]:
        assert set(record["site_timings"]) == set(SITES)
        for site, timing in record["site_timings"].items():
            per_round = -(-job.agents[site].data.train_samples // 32)
            assert timing["steps"] == per_round
            assert timing["compute"] + timing["exchange"] == pytest.approx(
                record["compute_seconds"][site], abs=2e-3
            )
            assert 0 < timing["codec"] <= timing["exchange"]
    steps = sum(-(-agent.data.train_samples // 32) * 2 for agent in job.agents.values())
    trunk = report["data_path"]["trunk"]
    assert trunk["activations"]["count"] == trunk["trunk-grad"]["count"] == steps
    assert all(t["seconds"] > 0 for t in trunk.values())
    codec = report["data_path"]["codec_seconds"]
    for key in ("decode activations", "encode trunk-out", "decode trunk-grad", "encode act-grad"):
        assert codec[key] > 0, key


def test_a_site_the_round_waits_for_too_long_is_late_and_the_status_says_why() -> None:
    sites = {s: SiteEntry(s, joined=True, connected=True) for s in ("a", "b")}
    closed = tuple(RoundRecord(r, seconds=3.0) for r in range(2))
    state = JobState(
        Phase.TRAINING, sites, {}, deadline=600.0, round=2, asked=("a", "b"),
        replies={}, record=RoundRecord(2), round_started=100.0, history=closed,
    )  # fmt: skip
    late = lateness(state, now=111.5, deadline_s=600)  # 11.5 s > 2 x 3 s + 5 s of grace
    assert late is not None and "round 2 has run 12 s; rounds take 3 s" in late
    assert lateness(state, now=110.5, deadline_s=600) is None  # 10.5 s: on time
    waiting = set(state.waiting_for)
    assert site_state(state.phase, sites["a"], waiting, late) == "late"
    assert site_state(state.phase, sites["a"], waiting, None) == "training"
    first = replace(state, round=0, history=(), record=RoundRecord(0))
    assert lateness(first, now=100.0 + 299, deadline_s=600) is None  # no round closed yet
    assert "of its 600 s deadline" in (lateness(first, now=100.0 + 301, deadline_s=600) or "")
    assert lateness(replace(state, phase=Phase.FINISHING), now=1e6, deadline_s=600) is None


def test_each_agent_counts_its_work_and_logs_one_line_per_round(job: JobResult) -> None:
    for site, agent in job.agents.items():
        samples = _samples(job, AgentCollector(lambda agent=agent: agent))
        assert samples["medsplit_agent_rounds_trained_total"][()] == 2  # sequential: every round
        steps = -(-agent.data.train_samples // 32) * 2  # batches of 32, two rounds
        assert samples["medsplit_agent_steps_total"][()] == steps
        assert samples["medsplit_agent_compute_seconds_total"][()] > 0
        stats = agent.endpoint.stats
        assert samples["medsplit_agent_bytes_total"][(("direction", "up"),)] == stats.sent_bytes
        assert samples["medsplit_agent_phase"][(("phase", "finished"),)] == 1
        lines = [line for line in ROUND_LINES.lines if line.startswith(f"{site} round ")]
        assert [line.split(":")[0] for line in lines] == [f"{site} round 0", f"{site} round 1"]
        assert "held-out accuracy" in lines[-1] and "MB up" in lines[-1]
