"""Bad or unexpected protocol messages are answered with errors and never stop a process."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from edge_agent.agent import Agent
from edge_agent.data import datasets
from experiments.inprocess import run_job
from medsplit.channel import Endpoint
from medsplit.protocol import Kind, topics
from medsplit.transport import MemoryBroker, MemoryTransport
from medsplit.wire import Envelope
from medsplit.wiring import memory_connector
from tests.component.test_split_learning import _config, _sites

JOB = "job-t"


def _connect(broker: MemoryBroker, client_id: str, *filters: str) -> MemoryTransport:
    transport = MemoryTransport(broker, client_id)
    transport.connect()
    for topic_filter in filters:
        transport.subscribe(topic_filter)
    return transport


def _site_agent(broker: MemoryBroker, **kw: object) -> tuple[Agent, threading.Thread]:
    transport = _connect(broker, "site-a", *topics.site_subscriptions(JOB, "site-a"))
    data = datasets.all_sites(datasets.load("breast-cancer"), 1, "iid")[0]
    agent = Agent("site-a", JOB, Endpoint(transport), data, hello_interval_s=0.2, **kw)  # type: ignore[arg-type]
    thread = threading.Thread(target=agent.run, kwargs={"max_seconds": 30}, daemon=True)
    thread.start()
    return agent, thread


def _next(endpoint: Endpoint, kind: str) -> Envelope:
    while True:
        received = endpoint.receive(timeout=10)
        assert received is not None, f"no {kind} arrived"
        if received.envelope.kind == kind:
            return received.envelope


@pytest.mark.parametrize(
    ("envelope", "errors", "rejected_by_wire"),
    [
        # A setup whose job spec is not even JSON: refused by the agent's protocol layer.
        (
            Envelope(JOB, "aggregator", "setup", meta={"spec": "{not json"}),
            {"ValueError", "ValidationError", "JSONDecodeError"},
            0,
        ),
        # Weights before setup: refused by the wire checks, before any model exists.
        (
            Envelope(JOB, "aggregator", "train", tensors={"hidden1.0.weight": torch.zeros(64, 30)}),
            {"TensorSpecMismatch"},
            1,
        ),
    ],
    ids=["bad-setup", "tensors-before-setup"],
)
def test_agent_answers_bad_messages_with_an_error_and_keeps_serving(
    envelope: Envelope, errors: set[str], rejected_by_wire: int
) -> None:
    broker = MemoryBroker()
    aggregator = Endpoint(_connect(broker, "aggregator", *topics.aggregator_subscriptions(JOB)))
    agent, thread = _site_agent(broker)
    _next(aggregator, "hello")
    aggregator.send(topics.down(JOB, "site-a", envelope.kind), envelope)
    error = _next(aggregator, "error")
    assert error.meta["error"] in errors
    assert sum(agent.endpoint.stats.rejected.values()) == rejected_by_wire
    # Still alive: it keeps saying hello, and a finish ends it cleanly.
    _next(aggregator, "hello")
    aggregator.send(topics.down(JOB, "site-a", "finish"), Envelope(JOB, "aggregator", "finish"))
    thread.join(10)
    assert agent.finished


def test_aggregator_ignores_strangers_and_rejects_malformed_activations(tmp_path: Path) -> None:
    config = _config(rounds=1, seal_segments=False)  # a scripted stranger beside one site
    broker = MemoryBroker()
    # A stranger (not in the job's site list) and a garbage uplink before the real site joins.
    stranger = _connect(broker, "stranger", *topics.site_subscriptions(JOB, "mallory"))

    def intrude() -> None:
        stranger.publish(topics.up(JOB, "mallory", "hello"), b"garbage that is not a frame")
        Endpoint(stranger).send(
            topics.up(JOB, "mallory", "hello"), Envelope(JOB, "mallory", "hello")
        )

    result = run_job(
        config,
        _sites(["site-a"]),
        memory_connector(broker),
        before_run=intrude,
        state_dir=tmp_path,
    )
    assert "mallory" not in result.coordinator.sites
    assert result.coordinator.endpoint.stats.rejected["BadMagic"] == 1
    assert len(result.history) == 1 and "site-a" in result.history[0].metrics
    # The stranger was told it is not in the job, once, and was sent nothing else.
    to_stranger = [topic for _, topic, _ in broker.published if "/mallory/down/" in topic]
    assert to_stranger == [topics.down(JOB, "mallory", "refused")]
    # The site kept its layers in its state directory.
    saved = load_file(str(tmp_path / "edge.safetensors"))
    assert set(saved) == set(result.coordinator.global_state)


class _CrashingAgent(Agent):
    """Dies in the middle of its first round, as a process killed mid-epoch would."""

    def ask(self, kind: str, tensors: dict[str, torch.Tensor], answer: str, **how: Any) -> Envelope:
        if kind == Kind.ACTIVATIONS and how["step"] == 3:
            raise SystemExit("site process killed")
        return super().ask(kind, tensors, answer, **how)


def test_a_restarted_site_says_hello_and_finishes_the_round() -> None:
    from aggregator.coordinator import Coordinator  # noqa: PLC0415

    config = _config(rounds=2, round_deadline_s=60, seal_segments=False)
    data = _sites(["site-a"])["site-a"]
    broker = MemoryBroker()
    aggregator_transport = _connect(broker, "aggregator", *topics.aggregator_subscriptions(JOB))
    coordinator = Coordinator(config, Endpoint(aggregator_transport))
    lives: list[Agent] = []

    def site_lifetimes() -> None:
        for attempt, cls in enumerate((_CrashingAgent, Agent)):
            transport = _connect(
                broker, f"site-a-{attempt}", *topics.site_subscriptions(JOB, "site-a")
            )
            agent = cls("site-a", JOB, Endpoint(transport), data, hello_interval_s=0.2)
            lives.append(agent)
            try:
                agent.run(max_seconds=60)
            except SystemExit:
                transport.drop()  # gone without a goodbye; a new process starts

    thread = threading.Thread(target=site_lifetimes, daemon=True)
    thread.start()
    history = coordinator.run()
    thread.join(30)
    assert len(lives) == 2 and lives[1].finished
    assert [r.missed for r in history] == [[], []]  # the restarted site did its turns
    assert all("site-a" in r.metrics for r in history)
