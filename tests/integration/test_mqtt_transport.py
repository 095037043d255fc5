"""The MQTT transport and endpoint against a real Mosquitto (started by the fixture)."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from experiments.relay import TcpProxy
from medsplit.brokers.mosquitto import Mosquitto, free_port
from medsplit.channel import Endpoint
from medsplit.protocol import topics
from medsplit.transport import (
    ConnectFailed,
    MqttSettings,
    MqttTransport,
    PublishTimeout,
    TransportClosed,
    Will,
)
from medsplit.wire import Envelope

pytestmark = pytest.mark.integration


def _settings(port: int, client_id: str | None = None, **kw: object) -> MqttSettings:
    return MqttSettings(
        host="127.0.0.1", port=port, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}", **kw
    )


@pytest.fixture
def job() -> str:
    return f"job-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def pair(mosquitto: Mosquitto, job: str) -> Iterator[tuple[Endpoint, Endpoint]]:
    """A site endpoint publishing up, and an aggregator endpoint subscribed to every uplink."""
    site = MqttTransport(_settings(mosquitto.port))
    agg = MqttTransport(_settings(mosquitto.port))
    site.connect()
    agg.connect()
    for topic_filter in topics.aggregator_subscriptions(job):
        agg.subscribe(topic_filter)
    yield Endpoint(site), Endpoint(agg)
    site.close()
    agg.close()


def test_50_mb_tensor_set_crosses_chunked_and_bit_identical(
    pair: tuple[Endpoint, Endpoint], job: str
) -> None:
    sender, receiver = pair
    generator = torch.Generator().manual_seed(7)
    tensors = {
        "activations": torch.randn(4096, 2048, generator=generator),  # 32 MiB fp32
        "weights.bf16": torch.randn(2048, 2048, generator=generator).to(torch.bfloat16),  # 8 MiB
        "indices": torch.randint(0, 2**62, (1024 * 1024,), generator=generator),  # 8 MiB int64
        "mask": torch.rand(2 * 1024 * 1024, generator=generator) > 0.5,  # 2 MiB bool
    }
    envelope = Envelope(job, "site-a", "activations", round=3, step=11, tensors=tensors)
    assert envelope.payload_nbytes() >= 50 * 1024 * 1024
    wire_bytes = sender.send(topics.up(job, "site-a", "activations"), envelope)
    assert wire_bytes > 50 * 1024 * 1024

    received = receiver.receive(timeout=60)
    assert received is not None
    got = received.envelope
    assert (got.msg_id, got.round, got.step) == (envelope.msg_id, 3, 11)
    assert got.tensors.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert got.tensors[name].dtype == tensor.dtype
        assert torch.equal(got.tensors[name], tensor), name
    # It really was chunked: ~200 frames under the 256 KiB default, every one delivered.
    assert receiver.stats.received_bytes == wire_bytes
    assert receiver.stats.received_frames == sender.stats.sent_frames >= 200
    assert wire_bytes <= sender.stats.sent_frames * sender.limits.max_frame_bytes


def _send_numbered(sender: Endpoint, job: str, count: int, start: int = 0) -> list[Envelope]:
    sent = []
    topic = topics.up(job, "site-a", "update")
    for step in range(start, start + count):
        envelope = Envelope(
            job, "site-a", "update", step=step, tensors={"x": torch.tensor([float(step)])}
        )
        sender.send(topic, envelope)
        sent.append(envelope)
    return sent


def _collect(receiver: Endpoint, count: int, timeout: float = 60) -> list[int]:
    steps = []
    while len(steps) < count:
        received = receiver.receive(timeout=timeout)
        assert received is not None, f"only {len(steps)} of {count} messages arrived"
        assert torch.all(received.envelope.tensors["x"] == received.envelope.step)
        steps.append(received.envelope.step)
    return steps


def test_1000_qos1_messages_arrive_exactly_once(pair: tuple[Endpoint, Endpoint], job: str) -> None:
    sender, receiver = pair
    sent = _send_numbered(sender, job, 1000)
    # Redeliver 100 of them, as a sender retrying after a publish timeout would.
    topic = topics.up(job, "site-a", "update")
    for envelope in sent[::10]:
        sender.send(topic, envelope)
    steps = _collect(receiver, 1000)
    assert sorted(steps) == list(range(1000))
    assert receiver.receive(timeout=0.5) is None  # nothing left over: the copies were dropped
    assert receiver.stats.duplicates == 100
    assert receiver.stats.rejected == {}


def test_exactly_once_when_receiver_connection_drops_mid_stream(
    mosquitto: Mosquitto, job: str
) -> None:
    proxy = TcpProxy(mosquitto.port)
    receiver_transport = MqttTransport(
        _settings(proxy.port, client_id=f"agg-{job}", reconnect_min_s=1, reconnect_max_s=2)
    )
    sender_transport = MqttTransport(_settings(mosquitto.port))
    try:
        receiver_transport.connect()
        sender_transport.connect()
        receiver_transport.subscribe(f"{topics.PREFIX}/{job}/+/up/+")
        receiver, sender = Endpoint(receiver_transport), Endpoint(sender_transport)

        publisher = threading.Thread(target=_send_numbered, args=(sender, job, 1000))
        publisher.start()
        first = _collect(receiver, 300)
        proxy.sever()  # the receiver's link breaks; the sender keeps publishing meanwhile
        rest = _collect(receiver, 700)
        publisher.join(60)
        assert not publisher.is_alive()

        assert sorted(first + rest) == list(range(1000))
        assert receiver.receive(timeout=0.5) is None
        assert receiver_transport.reconnects >= 1
        assert proxy.accepted >= 2  # it really came back through a new connection
    finally:
        receiver_transport.close()
        sender_transport.close()
        proxy.close()


def test_subscriptions_survive_reconnect_and_last_will_marks_site_offline(
    mosquitto: Mosquitto, job: str
) -> None:
    proxy = TcpProxy(mosquitto.port)
    presence = topics.presence(job, "site-b")
    site = MqttTransport(
        _settings(proxy.port, reconnect_min_s=1, reconnect_max_s=2, keepalive_s=5),
        will=Will(presence, b"offline"),
        birth=Will(presence, b"online"),
    )
    observer = MqttTransport(_settings(mosquitto.port))
    try:
        observer.connect()
        observer.subscribe(presence)
        site.connect()
        site.subscribe(topics.site_subscriptions(job, "site-b")[0])
        assert _next_payload(observer) == b"online"

        proxy.sever()  # unclean: the broker publishes the Last Will
        assert _next_payload(observer) == b"offline"
        assert _next_payload(observer) == b"online"  # reconnected, birth published again

        observer.publish(topics.down(job, "site-b", "plan"), b"hello again")
        message = site.receive(timeout=10)
        assert message is not None and message.payload == b"hello again"
    finally:
        site.close()
        observer.close()
        proxy.close()


def _next_payload(transport: MqttTransport) -> bytes:
    message = transport.receive(timeout=20)
    assert message is not None
    return message.payload


def test_socket_has_tcp_nodelay(mosquitto: Mosquitto) -> None:
    transport = MqttTransport(_settings(mosquitto.port))
    with transport:
        sock = transport._client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_connect_to_closed_port_fails_with_clear_error() -> None:
    port = free_port()
    transport = MqttTransport(_settings(port, retry_for_s=1.5))
    with pytest.raises(ConnectFailed, match=f"127.0.0.1:{port}"):
        transport.connect()
    transport.close()


def test_pipelined_sends_are_all_acknowledged_by_flush(
    pair: tuple[Endpoint, Endpoint], job: str
) -> None:
    sender, receiver = pair
    topic = topics.up(job, "site-a", "activations")
    for step in range(20):
        envelope = Envelope(
            job,
            "site-a",
            "activations",
            step=step,
            tensors={"x": torch.full((70_000,), float(step))},
        )
        sender.send(topic, envelope, wait=False)
    sender.flush()
    assert _collect(receiver, 20) == list(
        range(20)
    )  # one publisher, one topic, QoS 1: order is kept


def test_publish_times_out_clearly_when_the_broker_is_gone(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path).start()
    transport = MqttTransport(
        _settings(broker.port, publish_timeout_s=1.0, reconnect_min_s=1, reconnect_max_s=1)
    )
    transport.connect()
    broker.stop()
    with pytest.raises(PublishTimeout, match="did not acknowledge"):
        transport.publish("medsplit/v1/j/s/up/x", b"payload")
    transport.close()
    with pytest.raises(TransportClosed):
        transport.publish("medsplit/v1/j/s/up/x", b"payload")
