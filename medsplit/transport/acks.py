"""Matching broker acknowledgements (PUBACK, SUBACK) to the calls waiting for them.

paho reports acknowledgements by message id on its network thread, sometimes before the
publishing thread has even learnt the id. ``AckTracker`` bridges the two without holding any
lock across a paho call (paho invokes ``on_publish`` with its own mutex held, so doing so
could deadlock): an early acknowledgement is parked until its waiter registers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Ack:
    """One awaited acknowledgement. ``failure`` is the broker's reason when it refused."""

    mid: int
    done: threading.Event = field(default_factory=threading.Event)
    failure: str | None = None


class AckTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, Ack] = {}
        self._early: dict[int, str | None] = {}

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

    def resolve(self, mid: int, failure: str | None) -> None:
        """Called on paho's thread when the broker acknowledged ``mid``."""
        with self._lock:
            ack = self._waiting.pop(mid, None)
            if ack is None:
                self._early[mid] = failure
                return
        ack.failure = failure
        ack.done.set()

    def fail_all(self, reason: str) -> None:
        """Release every waiter (used on close)."""
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for ack in waiting.values():
            ack.failure = reason
            ack.done.set()
