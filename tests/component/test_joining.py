"""Joining a job over the in-memory transport: presence, repeated hellos, strangers, waits."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from aggregator.config import JobConfig
from aggregator.coordinator import Coordinator
from edge_agent.agent import Agent, NotInJob
from edge_agent.data import datasets
from edge_agent.lifecycle import AgentPhase
from experiments.inprocess import run_job
from medsplit.channel import Endpoint
from medsplit.protocol import Kind, topics
from medsplit.protocol.presence import Presence
from medsplit.transport import MemoryBroker, MemoryTransport
from medsplit.wire import Decoder, Envelope
from medsplit.wiring import JobAlreadyCoordinated, memory_connector, open_aggregator, open_site
from tests.support.configs import job_config

JOB = "job-j"


def _config(**overrides: object) -> JobConfig:
    base = {
        "job_id": JOB,
        "plan": "mlp-ehr-u",
        "mode": "split-u",
        "rounds": 1,
        "batch_size": 16,
        "sites": ["site-a"],
        "round_deadline_s": 60,
        "join_deadline_s": 60,
        # Sites scripted message by message here; sealed segments: test_sealed_segments.py.
        "seal_segments": False,
    }
    return job_config({**base, **overrides})


def _data() -> datasets.SiteData:
    return datasets.all_sites(datasets.load("breast-cancer"), 1, "iid")[0]


def _kinds_to(broker: MemoryBroker, site: str) -> list[str]:
    """Kinds of the envelopes the aggregator sent to ``site``, in order."""
    prefix = f"{topics.PREFIX}/{JOB}/{site}/down/"
    return [t.removeprefix(prefix) for _, t, _ in broker.published if t.startswith(prefix)]


def test_presence_never_reaches_the_envelope_decoder() -> None:
    broker = MemoryBroker()
    result = run_job(
        _config(sites=["site-a", "site-b"]),
        {"site-a": _data(), "site-b": _data()},
        memory_connector(broker),
    )
    presences = [t for _, t, _ in broker.published if topics.is_presence(t)]
    assert presences  # every party announced itself ...
    assert not result.coordinator.endpoint.stats.rejected  # ... and nobody decoded it as a frame
    for agent in result.agents.values():
        assert not agent.endpoint.stats.rejected
    for site in ("site-a", "site-b"):
        assert Kind.ERROR not in _kinds_to(broker, site)


def test_a_hello_repeated_before_setup_arrives_trains_the_turn_once() -> None:
    """A site whose hellos cross the aggregator's setup is asked to train once, not twice."""
    broker = MemoryBroker()
    aggregator = open_aggregator(JOB, memory_connector(broker))
    config = _config(normalization="none")  # this scripted site answers no statistics request
    coordinator = Coordinator(config, aggregator.endpoint, presence=aggregator.presence)
    site = open_site(JOB, "site-a", memory_connector(broker))
    data = _data()
    hello = {"train_samples": data.train_samples, "test_samples": 5, "incarnation": "x1"}
    for _ in range(3):  # three hellos in flight before the aggregator reads any of them
        Endpoint(site.transport).send(
            topics.up(JOB, "site-a", "hello"), Envelope(JOB, "site-a", "hello", meta=hello)
        )
    # Run the aggregator until it has asked for the first turn, then look at what it sent.
    while coordinator.state.round < 0:
        received = aggregator.endpoint.receive(timeout=5)
        assert received is not None, "the aggregator got no hello"
        coordinator.handle(received)
    while (received := aggregator.endpoint.receive(timeout=0.2)) is not None:
        coordinator.handle(received)
    kinds = _kinds_to(broker, "site-a")
    assert kinds.count("train") == 1, kinds
    assert kinds.count("setup") == 3  # each hello answered, idempotently
    aggregator.close()
    site.close()


def test_an_agent_ignores_a_repeated_setup_and_keeps_its_layers() -> None:
    broker = MemoryBroker()
    result = run_job(_config(rounds=2), {"site-a": _data()}, memory_connector(broker))
    agent = result.agents["site-a"]
    segments = agent.segments
    setup = next(
        Decoder().feed(p)
        for _, t, p in broker.published
        if t == topics.down(JOB, "site-a", "setup")
    )
    assert setup is not None
    agent._handle(setup)  # one more copy of the same setup
    assert agent.segments is segments  # not rebuilt: the trained layers stay


def test_a_site_that_is_not_in_the_job_is_told_so_and_stops() -> None:
    broker = MemoryBroker()
    aggregator = open_aggregator(JOB, memory_connector(broker))
    coordinator = Coordinator(_config(), aggregator.endpoint, presence=aggregator.presence)
    stranger = open_site(JOB, "mallory", memory_connector(broker))
    agent = Agent("mallory", JOB, stranger.endpoint, _data(), hello_interval_s=0.2)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            agent.run(max_seconds=30)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    while thread.is_alive():
        received = aggregator.endpoint.receive(timeout=0.2)
        if received is not None:
            coordinator.handle(received)
    assert len(errors) == 1 and isinstance(errors[0], NotInJob)
    assert "'mallory' is not part of job job-j" in str(errors[0])
    assert agent.phase == AgentPhase.REFUSED
    assert "mallory" not in coordinator.sites
    aggregator.close()


def test_a_second_aggregator_for_a_live_job_refuses_to_start() -> None:
    broker = MemoryBroker()
    first = open_aggregator(JOB, memory_connector(broker))
    with pytest.raises(JobAlreadyCoordinated, match=f"job {JOB} is already coordinated by "):
        open_aggregator(JOB, memory_connector(broker))
    with pytest.raises(JobAlreadyCoordinated) as info:
        open_aggregator(JOB, memory_connector(broker))
    assert info.value.live.incarnation == first.incarnation
    assert "up since" in str(info.value)
    open_aggregator("another-job", memory_connector(broker)).close()  # other jobs are free
    first.close()  # a clean exit says offline: the job may be coordinated again
    open_aggregator(JOB, memory_connector(broker)).close()


def test_an_aggregator_that_vanished_leaves_the_job_free() -> None:
    broker = MemoryBroker()
    first = open_aggregator(JOB, memory_connector(broker))
    assert isinstance(first.transport, MemoryTransport)
    first.transport.drop()  # killed: the broker publishes its Last Will
    open_aggregator(JOB, memory_connector(broker)).close()


@pytest.fixture
def agent_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="edge_agent")
    caplog.set_level(logging.INFO, logger="aggregator")
    return caplog


def test_an_agent_says_what_it_waits_for(agent_logs: pytest.LogCaptureFixture) -> None:
    broker = MemoryBroker()
    site = open_site(JOB, "site-a", memory_connector(broker))
    agent = Agent("site-a", JOB, site.endpoint, _data(), status_interval_s=0.05)
    with pytest.raises(TimeoutError):
        agent.run(max_seconds=0.3)
    waiting = [r.getMessage() for r in agent_logs.records if "waiting for" in r.getMessage()]
    assert waiting and all("none is online yet" in m for m in waiting)
    assert "job-j" in waiting[0]
    # Once an aggregator is online, the wait names it.
    live = Presence.online("aggregator", "aggregator")
    site.transport.publish(topics.aggregator_presence(JOB), live.to_bytes(), retain=True)
    agent_logs.clear()
    with pytest.raises(TimeoutError):
        agent.run(max_seconds=0.3)
    waiting = [r.getMessage() for r in agent_logs.records if "waiting for" in r.getMessage()]
    assert waiting and live.incarnation in waiting[-1]
    site.close()


def test_the_aggregator_says_whom_it_waits_for(agent_logs: pytest.LogCaptureFixture) -> None:
    broker = MemoryBroker()
    aggregator = open_aggregator(JOB, memory_connector(broker))
    config = _config(sites=["site-a", "site-b", "site-c"], join_deadline_s=0.5)
    config = config.model_copy(
        update={"waits": config.waits.model_copy(update={"status_interval_s": 0.1})}
    )
    coordinator = Coordinator(config, aggregator.endpoint, presence=aggregator.presence)
    site = open_site(JOB, "site-a", memory_connector(broker))
    agent = Agent("site-a", JOB, site.endpoint, _data(), hello_interval_s=0.1)
    thread = threading.Thread(target=agent.run, kwargs={"max_seconds": 5}, daemon=True)
    thread.start()
    with pytest.raises(Exception, match="only 1 of 3 sites joined"):
        coordinator.run()
    agent.stop()
    thread.join(5)
    waiting = [r.getMessage() for r in agent_logs.records if "waiting for sites" in r.getMessage()]
    assert any("1/3 joined, missing site-b, site-c" in m for m in waiting), waiting
    aggregator.close()


def test_an_agent_announces_itself_again_to_a_new_aggregator_epoch() -> None:
    broker = MemoryBroker()
    site = open_site(JOB, "site-a", memory_connector(broker))
    agent = Agent("site-a", JOB, site.endpoint, _data(), hello_interval_s=60)
    thread = threading.Thread(target=agent.run, kwargs={"max_seconds": 10}, daemon=True)
    first = open_aggregator(JOB, memory_connector(broker))
    coordinator = Coordinator(_config(rounds=5), first.endpoint, presence=first.presence)
    thread.start()
    while agent.phase == AgentPhase.ANNOUNCING:  # joins the first epoch
        received = first.endpoint.receive(timeout=1)
        if received is not None:
            coordinator.handle(received)
    hellos = lambda: sum(t == topics.up(JOB, "site-a", "hello") for _, t, _ in broker.published)  # noqa: E731
    before = hellos()
    assert isinstance(first.transport, MemoryTransport)
    first.transport.drop()  # the aggregator dies ...
    second = open_aggregator(JOB, memory_connector(broker))  # ... and a new epoch starts
    deadline = time.monotonic() + 10
    while hellos() == before:
        assert time.monotonic() < deadline, "the agent did not re-announce itself"
        second.endpoint.receive(timeout=0.1)
    agent.stop()
    thread.join(5)
    assert agent.aggregator is not None and agent.aggregator.incarnation == second.incarnation
    second.close()
    site.close()


def test_cut_layer_traffic_from_a_site_not_asked_never_touches_the_trunk() -> None:
    """A site whose turn is over (missed at the deadline, or not its turn) is not served."""
    broker = MemoryBroker()
    aggregator = open_aggregator(JOB, memory_connector(broker))
    config = _config(sites=["site-a", "site-b"], orchestration="sequential", normalization="none")
    coordinator = Coordinator(config, aggregator.endpoint, presence=aggregator.presence)
    for site in ("site-a", "site-b"):
        party = open_site(JOB, site, memory_connector(broker))
        hello = {"train_samples": 10, "test_samples": 5, "incarnation": site}
        Endpoint(party.transport).send(
            topics.up(JOB, site, "hello"), Envelope(JOB, site, "hello", meta=hello)
        )
    while coordinator.state.round < 0:
        received = aggregator.endpoint.receive(timeout=5)
        assert received is not None
        coordinator.handle(received)
    assert coordinator.state.waiting_for == ["site-a"]  # site-a's turn, not site-b's
    trunk_before = {k: v.clone() for k, v in coordinator.final_state().items()}
    from models import cut_shapes  # noqa: PLC0415

    head_out = cut_shapes(config.plan, 4)["head_out"]
    out_of_turn = Envelope(JOB, "site-b", "activations", tensors={"h": torch.randn(*head_out)})
    Endpoint(open_site(JOB, "site-b", memory_connector(broker), client_id="b2").transport).send(
        topics.up(JOB, "site-b", "activations"), out_of_turn
    )
    received = aggregator.endpoint.receive(timeout=5)
    assert received is not None
    coordinator.handle(received)
    assert coordinator.late_messages == 1
    assert "trunk-out" not in _kinds_to(broker, "site-b")
    after = coordinator.final_state()
    assert all(torch.equal(trunk_before[k], after[k]) for k in trunk_before)
    aggregator.close()
