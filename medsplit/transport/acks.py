"""Matching broker acknowledgements (PUBACK, SUBACK) to the calls waiting for them.

paho reports acknowledgements by message id on its network thread, sometimes before the
publishing thread has even learnt the id. ``AckTracker`` bridges the two without holding any
lock across a paho call (paho invokes ``on_publish`` with its own mutex held, so doing so
could deadlock): an early acknowledgement is parked until its waiter registers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from medsplit.transport.base import PublishRejected, PublishTimeout, TransportClosed
from medsplit.transport.reasons import reason


@dataclass
class Ack:
    """One awaited acknowledgement. ``failure`` is the broker's reason code when it refused."""

    mid: int
    done: threading.Event = field(default_factory=threading.Event)
    failure: int | None = None
    closed: bool = False


class AckTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, Ack] = {}
        self._early: dict[int, int | None] = {}

    def expect(self, mid: int) -> Ack:
        """Register interest in ``mid`` (call right after paho returned it)."""
        ack = Ack(mid)
        with self._lock:
            if mid in self._early:
                ack.failure = self._early.pop(mid)
                ack.done.set()
            else:
                self._waiting[mid] = ack
        return ack

    def resolve(self, mid: int, failure: int | None) -> None:
        """Called on paho's thread when the broker acknowledged ``mid``."""
        with self._lock:
            ack = self._waiting.pop(mid, None)
            if ack is None:
                self._early[mid] = failure
                return
        ack.failure = failure
        ack.done.set()

    def fail_all(self) -> None:
        """Release every waiter (used on close)."""
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for ack in waiting.values():
            ack.closed = True
            ack.done.set()


class Delivery:
    """The broker acknowledgements of one ``publish_all`` call.

    ``wait`` blocks until every message is acknowledged and raises ``PublishTimeout`` when no
    acknowledgement arrives for ``timeout_s`` (the clock restarts with each one, so a long
    chunked message is not cut off while it is making progress), ``PublishRejected`` when the
    broker refused one, ``TransportClosed`` when the transport was closed meanwhile.
    """

    def __init__(
        self,
        topic: str,
        acks: list[Ack],
        timeout_s: float,
        describe_link: Callable[[], str] = lambda: "connection up",
    ) -> None:
        self.topic = topic
        self._acks = acks
        self._timeout_s = timeout_s
        self._describe_link = describe_link

    @property
    def done(self) -> bool:
        return all(ack.done.is_set() for ack in self._acks)

    def wait(self) -> None:
        for index, ack in enumerate(self._acks):
            if not ack.done.wait(self._timeout_s):
                raise PublishTimeout(
                    f"broker did not acknowledge message {index + 1} of {len(self._acks)} on "
                    f"{self.topic!r} within {self._timeout_s:g} s ({self._describe_link()})"
                )
            if ack.closed:
                raise TransportClosed(f"publish to {self.topic!r} interrupted: transport closed")
            if ack.failure is not None:
                why = reason(ack.failure)
                raise PublishRejected(
                    f"broker rejected publication to {self.topic!r}: {why.name}",
                    reason_code=why.code,
                    permanent=why.permanent,
                )
