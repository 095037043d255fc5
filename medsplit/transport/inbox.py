"""A byte-bounded FIFO between a network thread and the consumer.

Network callbacks only ``put``; consumers ``get``. When more than ``max_bytes`` are waiting,
``put`` blocks: the MQTT client then stops reading and acknowledging, and the broker holds
further messages, which is the backpressure we want instead of unbounded memory growth.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class ByteBoundedQueue(Generic[T]):
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: deque[tuple[T, int]] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: T, nbytes: int) -> bool:
        """Enqueue; blocks while full. An item larger than the bound is accepted when empty.

        Returns False (and drops the item) only once the queue is closed.
        """
        with self._cond:
            while self._items and self._bytes + nbytes > self.max_bytes and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            self._items.append((item, nbytes))
            self._bytes += nbytes
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> T | None:
        """Dequeue the oldest item, or None after ``timeout`` seconds (or once closed and empty)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            item, nbytes = self._items.popleft()
            self._bytes -= nbytes
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
