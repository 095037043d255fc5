"""The Endpoint over the in-memory transport: routing, de-duplication, rejection, presence."""

from __future__ import annotations

import threading

import pytest
import torch

from medsplit.channel import Endpoint
from medsplit.protocol import topics
from medsplit.transport import MemoryBroker, MemoryTransport, TransportClosed, Will
from medsplit.transport.acks import Ack, Delivery
from medsplit.transport.base import PublishRejected
from medsplit.transport.inbox import ByteBoundedQueue
from medsplit.wire import Envelope, TensorSpec, WireError, WireLimits, encode

JOB = "job1"


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


def _connect(broker: MemoryBroker, client_id: str, *filters: str, **kw: object) -> MemoryTransport:
    transport = MemoryTransport(broker, client_id, **kw)  # type: ignore[arg-type]
    transport.connect()
    for topic_filter in filters:
        transport.subscribe(topic_filter)
    return transport


def test_envelopes_are_routed_by_topic(broker: MemoryBroker) -> None:
    agg = Endpoint(_connect(broker, "agg", *topics.aggregator_subscriptions(JOB)))
    site_a = Endpoint(_connect(broker, "a", *topics.site_subscriptions(JOB, "site-a")))
    site_b = Endpoint(_connect(broker, "b", *topics.site_subscriptions(JOB, "site-b")))

    site_a.send(
        topics.up(JOB, "site-a", "hello"), Envelope(JOB, "site-a", "hello", meta={"samples": 10})
    )
    got = agg.receive(timeout=1)
    assert got is not None and got.envelope.meta == {"samples": 10}

    agg.send(topics.down(JOB, "site-b", "plan"), Envelope(JOB, "aggregator", "plan"))
    assert site_a.receive(timeout=0.05) is None
    assert (r := site_b.receive(timeout=1)) is not None and r.envelope.kind == "plan"

    agg.send(topics.broadcast(JOB, "round"), Envelope(JOB, "aggregator", "round", round=4))
    assert [e.receive(timeout=1).envelope.round for e in (site_a, site_b)] == [4, 4]  # type: ignore[union-attr]


def test_redelivered_messages_are_returned_once(broker: MemoryBroker) -> None:
    agg_transport = _connect(broker, "agg", *topics.aggregator_subscriptions(JOB))
    agg = Endpoint(agg_transport, limits=WireLimits(max_frame_bytes=4096))
    site = _connect(broker, "a")
    envelope = Envelope(JOB, "site-a", "update", tensors={"w": torch.randn(3000)})
    frames = encode(envelope, limits=WireLimits(max_frame_bytes=4096))
    topic = topics.up(JOB, "site-a", "update")
    site.publish_all(topic, frames + frames[::-1])
    got = agg.receive(timeout=1)
    assert got is not None and torch.equal(got.envelope.tensors["w"], envelope.tensors["w"])
    assert agg.receive(timeout=0.05) is None
    assert agg.stats.duplicates == len(frames)
    assert agg.stats.received_messages == 1


def test_bad_messages_are_counted_reported_and_do_not_stop_receiving(broker: MemoryBroker) -> None:
    rejected: list[tuple[str, WireError]] = []
    specs = {"activations": {"x": TensorSpec(torch.float32, (None, 4))}}
    agg = Endpoint(
        _connect(broker, "agg", *topics.aggregator_subscriptions(JOB)),
        expected_for=lambda header: specs.get(header.kind),
        on_reject=lambda topic, error: rejected.append((topic, error)),
    )
    site = Endpoint(_connect(broker, "a"))
    topic = topics.up(JOB, "site-a", "activations")
    site.transport.publish(topic, b"garbage")
    site.send(topic, Envelope(JOB, "site-a", "activations", tensors={"x": torch.ones(2, 5)}))
    # Site a claims to be site b: the topic (what the broker's ACL vouches for) wins.
    site.send(topic, Envelope(JOB, "site-b", "activations", tensors={"x": torch.ones(2, 4)}))
    site.send(topic, Envelope(JOB, "site-a", "activations", tensors={"x": torch.ones(2, 4)}))

    got = agg.receive(timeout=1)
    assert got is not None and got.envelope.tensors["x"].shape == (2, 4)
    assert dict(agg.stats.rejected) == {
        "BadMagic": 1,
        "TensorSpecMismatch": 1,
        "MalformedHeader": 1,
    }
    assert [type(e).__name__ for _, e in rejected] == [
        "BadMagic",
        "TensorSpecMismatch",
        "MalformedHeader",
    ]
    assert all(t == topic for t, _ in rejected)


def test_a_failing_reject_handler_does_not_stop_receiving(broker: MemoryBroker) -> None:
    def explode(topic: str, error: WireError) -> None:
        raise RuntimeError("handler bug")

    agg = Endpoint(
        _connect(broker, "agg", *topics.aggregator_subscriptions(JOB)), on_reject=explode
    )
    site = _connect(broker, "a")
    topic = topics.up(JOB, "site-a", "x")
    site.publish(topic, b"junk")
    Endpoint(site).send(topic, Envelope(JOB, "site-a", "x"))
    assert agg.receive(timeout=1) is not None


def test_last_will_and_retained_birth(broker: MemoryBroker) -> None:
    presence = topics.presence(JOB, "site-a")
    site = _connect(broker, "a", will=Will(presence, b"offline"), birth=Will(presence, b"online"))
    late_observer = _connect(broker, "obs", f"{topics.PREFIX}/{JOB}/+/presence")
    first = late_observer.receive(timeout=1)
    assert first is not None and (first.payload, first.retained) == (b"online", True)
    site.drop()
    last = late_observer.receive(timeout=1)
    assert last is not None and last.payload == b"offline"


def test_clean_close_sends_no_will_and_refuses_further_use(broker: MemoryBroker) -> None:
    presence = topics.presence(JOB, "site-a")
    observer = _connect(broker, "obs", presence)
    site = _connect(broker, "a", will=Will(presence, b"offline"))
    site.close()
    assert observer.receive(timeout=0.05) is None
    with pytest.raises(TransportClosed):
        site.publish(presence, b"x")


def test_inbox_blocks_producers_when_full_and_releases_on_get() -> None:
    queue: ByteBoundedQueue[int] = ByteBoundedQueue(max_bytes=10)
    assert queue.put(1, 8)
    done = threading.Event()

    def producer() -> None:
        queue.put(2, 8)
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not done.wait(0.1)  # blocked: 16 bytes would exceed the bound
    assert queue.get(timeout=1) == 1
    assert done.wait(5)
    assert queue.get(timeout=1) == 2
    thread.join()
    queue.close()
    assert queue.get(timeout=1) is None


class _RefusingTransport(MemoryTransport):
    """Delivers, then reports the broker's refusal (135, not authorized) of each publication."""

    def publish_all(self, topic: str, payloads, *, qos: int = 1, wait: bool = True):  # type: ignore[no-untyped-def]
        super().publish_all(topic, payloads, qos=qos, wait=wait)
        ack = Ack(1, failure=135)
        ack.done.set()
        return Delivery(topic, [ack], timeout_s=1.0)


def test_a_pipelined_send_refused_by_the_broker_raises_at_the_next_send(
    broker: MemoryBroker,
) -> None:
    endpoint = Endpoint(_RefusingTransport(broker, "a"))
    endpoint.transport.connect()
    envelope = Envelope(JOB, "a", "activations", tensors={"h": torch.ones(2)})
    endpoint.send("t/1", envelope, wait=False)  # returns before its acknowledgement is read
    with pytest.raises(PublishRejected, match="not authorized"):
        endpoint.send("t/2", envelope, wait=False)
    endpoint.flush()  # the refusal was reported once, not again


def test_codec_time_is_counted_by_operation_and_kind(broker: MemoryBroker) -> None:
    sender = Endpoint(_connect(broker, "a"))
    receiver = Endpoint(_connect(broker, "b", "t/#"))
    sender.send("t/1", Envelope(JOB, "a", "activations", tensors={"h": torch.ones(64, 64)}))
    assert receiver.receive(timeout=5) is not None
    assert sender.stats.codec_seconds["encode activations"] > 0
    assert receiver.stats.codec_seconds["decode activations"] > 0
    assert set(receiver.stats.codec_seconds) == {"decode activations"}
