"""An in-process broker and transport with the same interface as ``MqttTransport``.

For unit tests of everything above the transport (endpoints, agents, the aggregator's state
machine): same topics and filters, retained messages, Last Will on ``drop()``, and
``publish_all`` ordering, with no sockets and no threads of its own. Integration tests use a
real Mosquitto instead.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence

from medsplit.protocol.topics import matches
from medsplit.transport.acks import Delivery
from medsplit.transport.base import ConnectFailed, Inbound, TransportClosed, TransportError, Will
from medsplit.transport.inbox import ByteBoundedQueue, branch


class MemoryBroker:
    """Routes publications between ``MemoryTransport`` clients of one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[str, MemoryTransport] = {}
        self._retained: dict[str, bytes] = {}
        self.published: list[tuple[str, str, bytes]] = []  # (client id, topic, payload), for tests
        # Fault injection for tests: a publication for which this returns True reaches nobody,
        # as a message lost in a broker restart would.
        self.lose: Callable[[str, bytes], bool] | None = None

    def attach(self, client: MemoryTransport) -> None:
        with self._lock:
            if client.client_id in self._clients:
                raise ConnectFailed(f"client id {client.client_id!r} is already connected")
            self._clients[client.client_id] = client

    def detach(self, client: MemoryTransport, *, send_will: bool) -> None:
        with self._lock:
            self._clients.pop(client.client_id, None)
        if send_will and client.will is not None:
            self.route(client.client_id, client.will.topic, client.will.payload, client.will.retain)

    def subscribe(self, client: MemoryTransport, topic_filter: str) -> None:
        with self._lock:
            retained = [(t, p) for t, p in self._retained.items() if matches(topic_filter, t)]
        for topic, payload in retained:
            client.deliver(Inbound(topic, payload, retained=True))

    def route(self, sender: str, topic: str, payload: bytes, retain: bool) -> None:
        if "+" in topic or "#" in topic or not topic:
            raise TransportError(f"cannot publish to {topic!r}: not a valid topic name")
        with self._lock:
            self.published.append((sender, topic, payload))
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            receivers = [c for c in self._clients.values() if c.wants(topic)]
            if self.lose is not None and self.lose(topic, payload):
                receivers = []
        for client in receivers:
            client.deliver(Inbound(topic, payload))


class MemoryTransport:
    """A ``Transport`` attached to a ``MemoryBroker``."""

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        *,
        will: Will | None = None,
        birth: Will | None = None,
        inbox_max_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self._birth = birth
        self._filters: set[str] = set()
        self._inbox: ByteBoundedQueue[Inbound] = ByteBoundedQueue(inbox_max_bytes)
        self._connected = False
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        self._check_open()
        self.broker.attach(self)
        self._connected = True
        if self._birth is not None:
            self.publish(self._birth.topic, self._birth.payload, retain=self._birth.retain)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._connected:
            self.broker.detach(self, send_will=False)
        self._connected = False
        self._inbox.close()

    def drop(self) -> None:
        """Simulate an unclean disconnect: the broker publishes our Last Will."""
        self._connected = False
        self.broker.detach(self, send_will=True)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._check_open()
        self._filters.add(topic_filter)
        self.broker.subscribe(self, topic_filter)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self._check_open()
        if not self._connected:
            raise TransportError("not connected")
        self.broker.route(self.client_id, topic, bytes(payload), retain)

    def publish_all(
        self, topic: str, payloads: Sequence[bytes], *, qos: int = 1, wait: bool = True
    ) -> Delivery:
        for payload in payloads:
            self.publish(topic, payload, qos=qos)
        return Delivery(topic, [], timeout_s=0.0)  # delivered synchronously: nothing to wait for

    @property
    def throttled(self) -> Counter[str]:
        """Messages dropped because their topic branch held its share of the inbox."""
        return self._inbox.throttled

    def receive(self, timeout: float | None = None) -> Inbound | None:
        if self._closed:
            raise TransportClosed("receive() after close()")
        return self._inbox.get(timeout)

    # -- used by the broker ---------------------------------------------------------------------

    def wants(self, topic: str) -> bool:
        return any(matches(f, topic) for f in self._filters)

    def deliver(self, message: Inbound) -> None:
        self._inbox.put(message, len(message.payload), branch(message.topic))

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed("transport is closed")
