"""A member turned hostile (in-memory broker): mistyped metadata, a transition that fails,
refused replies under the default min_sites, kinds the mode does not use, hello floods.

Each job must complete for the honest sites, with every refusal counted by reason, and
/status and report.json must stay valid JSON whatever the hostile site sent."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from aggregator import state as job_state
from aggregator.observability import status
from aggregator.report import build_report
from edge_agent.agent import Agent
from experiments.inprocess import JobResult, run_job
from medsplit.protocol import Kind, topics
from medsplit.transport import MemoryBroker
from medsplit.wire import Envelope, encode
from medsplit.wiring import memory_connector
from tests.component.test_hostile_sites import SITES, _config, _data

HOSTILE = "site-e"


def _strict_json(result: JobResult) -> None:
    """/status and report.json as the HTTP server and the report writer would make them."""
    json.dumps(status(result.coordinator), allow_nan=False)
    json.dumps(build_report(result.coordinator, 1.0), allow_nan=False)


class MistypingAgent(Agent):
    """Site e reports bytes_up as "x" in round 0 and a train_loss of "nan" in round 1."""

    def _publish(
        self, envelope: Envelope, cast: set[str] | None = None, *, wait: bool = True
    ) -> None:
        if self.site_id == HOSTILE and (envelope.kind, envelope.round) == (Kind.METRICS, 0):
            envelope = replace(envelope, meta={**envelope.meta, "bytes_up": "x"})
        if self.site_id == HOSTILE and (envelope.kind, envelope.round) == (Kind.DONE, 1):
            envelope = replace(envelope, meta={**envelope.meta, "train_loss": "nan"})
        super()._publish(envelope, cast, wait=wait)


def test_mistyped_metadata_is_refused_and_costs_only_that_sites_step() -> None:
    result = run_job(
        _config(), _data(), memory_connector(MemoryBroker()), agent_type=MistypingAgent
    )
    coordinator = result.coordinator
    assert len(result.history) == 3  # the job completed
    assert HOSTILE not in result.history[0].metrics  # its metrics of round 0 were refused
    assert HOSTILE in result.history[1].missed  # and its update of round 1
    assert sorted(result.history[2].trained) == SITES
    assert coordinator.endpoint.stats.rejected["BadMeta"] == 2
    assert coordinator.conduct.refusals["BadMeta"] == 2
    assert coordinator.conduct.refused_from[HOSTILE] == 2
    report = build_report(coordinator, 1.0)
    assert report["faults"]["refused"] == {"BadMeta": 2}
    _strict_json(result)


def test_an_exception_inside_a_transition_drops_the_event_and_the_job_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = job_state.JobMachine._evaluated

    def fails_once(
        machine: job_state.JobMachine, state: job_state.JobState, event: job_state.Evaluated
    ) -> job_state.JobState:
        if (event.site, event.round) == (HOSTILE, 0):
            raise ZeroDivisionError("injected")
        return original(machine, state, event)

    monkeypatch.setattr(job_state.JobMachine, "_evaluated", fails_once)
    config = _config(round_deadline_s=10)  # the dropped metrics are waited for until then
    result = run_job(config, _data(), memory_connector(MemoryBroker()))
    assert result.coordinator.conduct.dropped_events == {"Evaluated": 1}
    assert len(result.history) == 3
    assert set(result.history[0].metrics) == set(SITES) - {HOSTILE}
    assert set(result.history[1].metrics) == set(SITES)
    assert build_report(result.coordinator, 1.0)["faults"]["dropped_events"] == {"Evaluated": 1}


class InflatingAgent(Agent):
    """Site e claims a billion samples in every update."""

    def _publish(
        self, envelope: Envelope, cast: set[str] | None = None, *, wait: bool = True
    ) -> None:
        if self.site_id == HOSTILE and envelope.kind == Kind.DONE:
            envelope = replace(envelope, meta={**envelope.meta, "samples": 10**9})
        super()._publish(envelope, cast, wait=wait)


def test_with_the_default_min_sites_a_refused_site_costs_its_turn_not_the_job() -> None:
    config = _config()
    assert config.rounds.min_sites is None and config.quorum == 3  # a majority of five
    result = run_job(config, _data(), memory_connector(MemoryBroker()), agent_type=InflatingAgent)
    assert len(result.history) == 3
    for record in result.history:
        assert record.missed == [HOSTILE] and HOSTILE not in record.trained
    assert result.coordinator.conduct.refusals == {"ClaimsTooManySamples": 3}
    assert build_report(result.coordinator, 1.0)["faults"]["refused_from"] == {HOSTILE: 3}


def _rogue_publishes(broker: MemoryBroker, messages: list[tuple[str, Envelope]]) -> int:
    """Publish ``messages`` as a second client holding site-a's identity; returns the bytes."""
    rogue = memory_connector(broker)("rogue-twin")
    rogue.connect()
    sent = 0
    for topic, envelope in messages:
        for frame in encode(envelope):
            rogue.publish(topic, frame)
            sent += len(frame)
    return sent


def test_kinds_the_mode_does_not_use_are_rejected_not_counted_as_late() -> None:
    broker = MemoryBroker()
    flood = 2_000
    activations = [
        (
            topics.up("hostile", "site-a", Kind.ACTIVATIONS),
            Envelope("hostile", "site-a", Kind.ACTIVATIONS, round=0),
        )
        for _ in range(flood)
    ]
    result = run_job(
        _config(), _data(), memory_connector(broker), before_run=lambda: _rogue_publishes(
            broker, activations
        )
    )  # fmt: skip
    stats = result.coordinator.endpoint.stats
    assert stats.rejected["UnexpectedKind"] == flood
    assert result.coordinator.late_messages < 10  # (a few replays of its own, at most)
    assert len(result.history) == 3


def _down(broker: MemoryBroker, site: str) -> dict[str, tuple[int, int]]:
    """What the aggregator published to ``site``: (frames, bytes) by kind."""
    out: dict[str, tuple[int, int]] = {}
    prefix = f"medsplit/v1/hostile/{site}/down/"
    for client, topic, payload in broker.published:
        if client.startswith("aggregator") and topic.startswith(prefix):
            frames, size = out.get(topic.removeprefix(prefix), (0, 0))
            out[topic.removeprefix(prefix)] = (frames + 1, size + len(payload))
    return out


def _hellos(count: int) -> list[tuple[str, Envelope]]:
    """Hellos of ``count`` made-up agent processes of site-a."""
    meta: dict[str, Any] = {"train_samples": 80, "test_samples": 20}
    return [
        (
            topics.up("hostile", "site-a", Kind.HELLO),
            Envelope("hostile", "site-a", Kind.HELLO, meta={**meta, "incarnation": f"fake{i}"}),
        )
        for i in range(count)
    ]


def test_a_flood_of_new_incarnations_is_not_amplified() -> None:
    """1,000 hellos, each from a "new" agent process, while the site is asked to train."""
    clean_broker, broker = MemoryBroker(), MemoryBroker()
    run_job(_config(), _data(), memory_connector(clean_broker))
    sent: list[int] = []

    class FloodingAgent(Agent):
        def _train(self, env: Envelope) -> None:
            if self.site_id == "site-a" and env.round == 1 and not sent:
                sent.append(_rogue_publishes(broker, _hellos(1_000)))
            super()._train(env)

    result = run_job(_config(), _data(), memory_connector(broker), agent_type=FloodingAgent)
    assert len(result.history) == 3
    clean, flooded = _down(clean_broker, "site-a"), _down(broker, "site-a")
    assert result.coordinator.endpoint.stats.rejected["RateLimited"] >= 1_000 - 3
    # Three hellos per 10 s are answered (a setup each); the train request goes out again at
    # most once per retry interval.
    assert flooded["setup"][0] <= clean["setup"][0] + 3, (clean, flooded)
    assert flooded["train"][0] <= clean["train"][0] + 1, (clean, flooded)
    extra = sum(size for _, size in flooded.values()) - sum(size for _, size in clean.values())
    assert extra < sent[0] / 10, (extra, sent[0])


class DivergingAgent(Agent):
    """Site e's model goes non-finite in round 0: its weights cannot be sent."""

    def _publish(
        self, envelope: Envelope, cast: set[str] | None = None, *, wait: bool = True
    ) -> None:
        if self.site_id == HOSTILE and (envelope.kind, envelope.round) == (Kind.DONE, 0):
            nan = {k: v * float("nan") for k, v in envelope.tensors.items()}
            envelope = replace(envelope, tensors=nan)
        super()._publish(envelope, cast, wait=wait)


def test_a_site_that_cannot_answer_says_so_and_the_step_goes_on_without_it() -> None:
    config = _config(round_deadline_s=600)  # the job would wait this out without the error
    result = run_job(config, _data(), memory_connector(MemoryBroker()), agent_type=DivergingAgent)
    assert result.history[0].missed == [HOSTILE]
    assert result.coordinator.conduct.refusals == {"SiteError:NonFiniteTensor": 1}
    assert sorted(result.history[1].trained) == SITES
