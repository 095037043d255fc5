"""A byte-bounded, fair FIFO between a network thread and the consumer.

Network callbacks only ``put``; consumers ``get``. When more than ``max_bytes`` are waiting,
``put`` blocks: the MQTT client then stops reading and acknowledging, and the broker holds
further messages, which is the backpressure we want instead of unbounded memory growth.

Messages are queued per *branch* (the topic without its last level: one sender's uplink, say)
and handed out round-robin across branches, so a peer that floods cannot starve the others:
their messages are served between its own. When the inbox is full, a branch holding more than
``max_bytes // FAIR_SHARE`` while other branches wait has its new message dropped and counted
in ``throttled`` instead of blocking: blocking would stall every other sender behind it. A
branch alone in the inbox (one large message from one sender) still gets backpressure.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from typing import Generic, TypeVar

T = TypeVar("T")
FAIR_SHARE = 4  # one branch may fill at most a quarter of the inbox


def branch(topic: str) -> str:
    """The queue a message of ``topic`` waits in: everything but the topic's last level."""
    return topic.rpartition("/")[0]


class ByteBoundedQueue(Generic[T]):
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.max_branch_bytes = max(1, max_bytes // FAIR_SHARE)
        # Branch -> its items; the OrderedDict's order is the round-robin turn.
        self._branches: OrderedDict[str, deque[tuple[T, int]]] = OrderedDict()
        self._branch_bytes: Counter[str] = Counter()
        self._bytes = 0
        self._count = 0
        self._cond = threading.Condition()
        self._closed = False
        self.throttled: Counter[str] = Counter()  # dropped messages, by branch

    def put(self, item: T, nbytes: int, key: str = "") -> bool:
        """Enqueue in branch ``key``; blocks while the whole queue is full. An item larger than
        a bound is accepted when its branch (or the queue) is empty.

        Returns False (and drops the item) once the queue is closed, or when the queue is full
        and branch ``key`` holds more than its share while others wait (``throttled``)."""
        with self._cond:
            while self._count and self._bytes + nbytes > self.max_bytes and not self._closed:
                if self._hogging(key, nbytes):
                    self.throttled[key] += 1
                    return False
                self._cond.wait()
            if self._closed:
                return False
            self._branches.setdefault(key, deque()).append((item, nbytes))
            self._branch_bytes[key] += nbytes
            self._bytes += nbytes
            self._count += 1
            self._cond.notify_all()
            return True

    def _hogging(self, key: str, nbytes: int) -> bool:
        held = self._branch_bytes.get(key, 0)
        others = len(self._branches) - (key in self._branches)
        return held > 0 and held + nbytes > self.max_branch_bytes and others > 0

    def get(self, timeout: float | None = None) -> T | None:
        """The oldest item of the next branch in turn, or None after ``timeout`` seconds (or
        once closed and empty)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._count:
                if self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            key, items = next(iter(self._branches.items()))
            item, nbytes = items.popleft()
            if items:
                self._branches.move_to_end(key)  # its next item waits for the others' turn
            else:
                del self._branches[key]
            self._branch_bytes[key] -= nbytes
            if not self._branch_bytes[key]:
                del self._branch_bytes[key]
            self._bytes -= nbytes
            self._count -= 1
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return self._count
