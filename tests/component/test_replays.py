"""Repeats, replays and junk that a faulty link or a hostile sender produce: none is applied
twice, none grows the aggregator's memory, none stalls a step.

A hand-driven site (its own endpoint on the in-memory broker) talks to a real ``Coordinator``
running in a thread, so each test controls exactly which frames arrive in which order.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
import torch

from aggregator.coordinator import Coordinator, JobInterrupted
from edge_agent.agent import Agent
from medsplit.channel import Endpoint
from medsplit.protocol import Kind, topics
from medsplit.protocol.presence import Presence
from medsplit.transport import MemoryBroker, MemoryTransport
from medsplit.wire import Envelope, encode
from tests.component.test_protocol_robustness import _next
from tests.component.test_split_learning import _config, _sites

JOB = "job-t"
SITE = "site-a"


class HandSite:
    """A site whose every message the test writes itself."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.transport = MemoryTransport(broker, "hand-site")
        self.transport.connect()
        for topic_filter in topics.site_subscriptions(JOB, SITE):
            self.transport.subscribe(topic_filter)
        self.endpoint = Endpoint(self.transport)

    def send(self, envelope: Envelope) -> Envelope:
        self.endpoint.send(topics.up(JOB, SITE, envelope.kind), envelope)
        return envelope

    def send_again(self, envelope: Envelope) -> None:
        """The same frames once more (a QoS 1 redelivery, or a retry with the same id)."""
        for frame in encode(envelope):
            self.transport.publish(topics.up(JOB, SITE, envelope.kind), frame)

    def next(self, kind: str) -> Envelope:
        while True:
            received = self.endpoint.receive(timeout=10)
            assert received is not None, f"no {kind} arrived"
            if received.envelope.kind == kind:
                return received.envelope


@pytest.fixture
def job() -> Iterator[tuple[Coordinator, HandSite, Envelope, MemoryBroker]]:
    """A split-u job of one site, joined and asked to train round 0."""
    broker = MemoryBroker()
    transport = MemoryTransport(broker, "aggregator")
    transport.connect()
    for topic_filter in topics.aggregator_subscriptions(JOB):
        transport.subscribe(topic_filter)
    config = _config(rounds=1, normalization="none", seal_segments=False)  # scripted site
    coordinator = Coordinator(config, Endpoint(transport))

    def drive() -> None:
        with contextlib.suppress(JobInterrupted):  # how each test ends it
            coordinator.run()

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    site = HandSite(broker)
    site.send(Envelope(JOB, SITE, Kind.HELLO, meta={"incarnation": "one", "train_samples": 32}))
    site.next(Kind.SETUP)
    train = site.next(Kind.TRAIN)
    yield coordinator, site, train, broker
    coordinator.stop()
    thread.join(10)


def _activations(round: int, step: int) -> Envelope:
    return Envelope(
        JOB, SITE, Kind.ACTIVATIONS, round=round, step=step, tensors={"h": torch.randn(4, 64)}
    )


def test_steps_a_sender_names_at_will_never_grow_the_aggregators_state(
    job: tuple[Coordinator, HandSite, Envelope, MemoryBroker],
) -> None:
    coordinator, site, _, _ = job
    assert coordinator.trunk is not None
    late = coordinator.late_messages
    for step in range(10):  # well-formed, but for a round that is not running
        site.send(_activations(999, step))
    for step in range(10):  # the current round: at most one open step per site is kept
        site.send(_activations(0, step))
        site.next(Kind.TRUNK_OUT)
    assert coordinator.trunk.open_steps == 1
    assert coordinator.late_messages == late + 10


def test_a_repeated_step_gets_the_same_answer_and_updates_the_trunk_once(
    job: tuple[Coordinator, HandSite, Envelope, MemoryBroker],
) -> None:
    coordinator, site, _, broker = job
    assert coordinator.trunk is not None
    request = site.send(_activations(0, 0))
    out = site.next(Kind.TRUNK_OUT)
    grad = site.send(
        Envelope(
            JOB,
            SITE,
            Kind.TRUNK_GRAD,
            round=0,
            step=0,
            tensors={"g": torch.ones_like(out.tensors["t"])},
        )
    )
    site.next(Kind.ACT_GRAD)
    after_one = {k: v.clone() for k, v in coordinator.trunk.module.state_dict().items()}
    down = topics.down(JOB, SITE, Kind.ACT_GRAD)
    sent_before = [p for _, t, p in broker.published if t == down]
    site.send_again(grad)  # its answer was lost: the site asks again with the same id
    site.send_again(request)
    site.send(_activations(0, 1))  # a fresh step: once answered, the repeats were handled
    site.next(Kind.TRUNK_OUT)
    sent_after = [p for _, t, p in broker.published if t == down]
    assert len(sent_after) == len(sent_before) + 1 and sent_after[-1] == sent_before[-1]
    now = coordinator.trunk.module.state_dict()
    assert all(torch.equal(now[k], after_one[k]) for k in now)  # no second update


def test_an_answer_to_no_open_request_is_dropped(
    job: tuple[Coordinator, HandSite, Envelope, MemoryBroker],
) -> None:
    coordinator, site, train, _ = job
    weights = {k: v.clone() for k, v in train.tensors.items()}
    late = coordinator.late_messages
    forged = Envelope(JOB, SITE, Kind.DONE, round=0, tensors=weights, meta={"samples": 10**6})
    site.send(forged)  # right round and tensors, but it answers nothing this aggregator asked
    site.send(Envelope(JOB, SITE, Kind.HELLO, meta={"incarnation": "one"}))
    site.next(Kind.SETUP)  # the hello was handled, so the forged done before it was too
    assert coordinator.late_messages == late + 1
    assert coordinator.state.waiting_for == [SITE]  # still training
    site.send(train.reply(SITE, Kind.DONE, tensors=weights, meta={"samples": 32}))
    site.next(Kind.EVALUATE)  # the real answer closes the turn


def test_an_agent_drops_requests_of_an_earlier_aggregator_epoch() -> None:
    broker = MemoryBroker()
    aggregator = MemoryTransport(broker, "aggregator")
    aggregator.connect()
    for topic_filter in topics.aggregator_subscriptions(JOB):
        aggregator.subscribe(topic_filter)
    endpoint = Endpoint(aggregator)
    live = Presence.online("aggregator", "aggregator")
    aggregator.publish(topics.aggregator_presence(JOB), live.to_bytes(), retain=True)
    transport = MemoryTransport(broker, SITE)
    transport.connect()
    for topic_filter in topics.site_subscriptions(JOB, SITE):
        transport.subscribe(topic_filter)
    agent = Agent(SITE, JOB, Endpoint(transport), _sites([SITE])[SITE], hello_interval_s=0.2)
    thread = threading.Thread(target=agent.run, kwargs={"max_seconds": 30}, daemon=True)
    thread.start()
    hello = _next(endpoint, Kind.HELLO)
    spec = _coordinator_spec()
    for epoch in ("an-old-epoch", live.incarnation):
        setup = hello.reply("aggregator", Kind.SETUP, meta={"spec": spec, "epoch": epoch})
        endpoint.send(topics.down(JOB, SITE, Kind.SETUP), setup)
    asks = [
        Envelope(JOB, "aggregator", Kind.STATS_REQUEST, meta={"epoch": epoch})
        for epoch in ("an-old-epoch", live.incarnation)
    ]
    for ask in asks:
        endpoint.send(topics.down(JOB, SITE, Kind.STATS_REQUEST), ask)
    answer = _next(endpoint, Kind.STATS)
    assert answer.reply_to == asks[1].msg_id  # the old epoch's request was dropped, unanswered
    agent.stop()
    thread.join(10)
    assert agent.spec is not None and agent.endpoint.stats.sent_messages >= 2


def _coordinator_spec() -> str:
    broker = MemoryBroker()
    transport = MemoryTransport(broker, "x")
    transport.connect()
    spec = Coordinator(_config(rounds=1, seal_segments=False), Endpoint(transport)).spec.to_meta()
    assert isinstance(spec, str)
    return spec
