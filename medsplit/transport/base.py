"""The transport interface: bytes to and from topics, and the errors it may raise.

Kept deliberately tiny (like httpx's transport): connect, subscribe, publish with broker
acknowledgement, receive, close. ``MqttTransport`` implements it over paho-mqtt;
``MemoryTransport`` implements it in-process for fast unit tests. Everything above the
transport (the ``Endpoint``, agents, the aggregator) is written against this interface only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from medsplit.transport.acks import Delivery


class TransportError(Exception):
    """Base class of transport failures; library errors are mapped to these at the boundary.

    ``reason_code`` is the broker's MQTT 5 reason code when the broker refused something (see
    ``medsplit.transport.reasons``), None for failures below MQTT (sockets, TLS, timeouts);
    ``permanent`` says whether retrying the same request can succeed.
    """

    def __init__(
        self, message: str, *, reason_code: int | None = None, permanent: bool = False
    ) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.permanent = permanent

    @property
    def not_authorized(self) -> bool:
        """The broker's ACL or authentication refused us (retrying will not help)."""
        from medsplit.transport.reasons import BAD_CREDENTIALS, NOT_AUTHORIZED  # noqa: PLC0415

        return self.reason_code in (NOT_AUTHORIZED, BAD_CREDENTIALS)


class ConnectFailed(TransportError):
    """The broker could not be reached or refused the connection (reason in the message)."""


class PublishTimeout(TransportError):
    """The broker did not acknowledge a publication in time.

    The message may still be delivered later (it stays queued for the next connection);
    receivers de-duplicate by message id, so publishing it again is safe.
    """


class PublishRejected(TransportError):
    """The broker acknowledged a publication with a failure reason (e.g. not authorized)."""


class SubscribeFailed(TransportError):
    """The broker refused a subscription (e.g. the ACL does not allow that topic)."""


class TransportClosed(TransportError):
    """The transport was used after ``close()``."""


@dataclass(frozen=True)
class Inbound:
    """One received MQTT message."""

    topic: str
    payload: bytes
    retained: bool = False


@dataclass(frozen=True)
class Will:
    """A message the broker publishes for us if we vanish (and ``birth`` when we connect)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@runtime_checkable
class Transport(Protocol):
    """What every transport provides. All methods are safe to call from any thread."""

    @property
    def connected(self) -> bool: ...

    def connect(self) -> None:
        """Connect and start the network loop; raises ConnectFailed."""

    def close(self) -> None:
        """Disconnect cleanly (no Last Will) and stop; idempotent."""

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe, and re-subscribe after every reconnect; waits for the broker's SUBACK.

        Before ``connect()``: the subscription is made when connecting, ahead of the birth
        message, and ``connect()`` returns once the broker confirmed it."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish one message and wait for the broker's acknowledgement (QoS 1)."""

    def publish_all(
        self, topic: str, payloads: Sequence[bytes], *, qos: int = 1, wait: bool = True
    ) -> Delivery:
        """Publish several messages pipelined, in order; with ``wait``, until all are acknowledged.

        With ``wait=False`` it returns once the messages are handed to the client; call
        ``wait()`` on the returned ``Delivery`` later (or never, for fire-and-forget).
        """

    def receive(self, timeout: float | None = None) -> Inbound | None:
        """The next received message, or None when ``timeout`` seconds pass without one.

        Messages are served round-robin across topic branches (``inbox.branch``), so one
        flooding sender cannot starve the others."""

    @property
    def throttled(self) -> Counter[str]:
        """Messages dropped, by topic branch, because that branch held its share of the inbox."""
        ...
