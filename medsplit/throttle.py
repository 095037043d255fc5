"""At most a few of something per key and interval: log lines and error replies under a flood.

A peer that sends 10,000 bad frames must not get 10,000 error envelopes back (amplification)
nor write 10,000 log lines; it is answered and logged a few times per interval, and the rest
is counted, so reports and metrics still see every one.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

MAX_KEYS = 4096  # bounded whatever keys a hostile peer makes up
ERROR_REPLY_BURST, ERROR_REPLY_INTERVAL_S = 3, 10.0  # error envelopes to one peer


class Throttle:
    """``allow(key)``: True for the first ``burst`` calls per key in each ``interval_s``."""

    def __init__(
        self, burst: int, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = burst
        self.interval_s = interval_s
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}
        self.suppressed: Counter[str] = Counter()  # calls refused, by key, since last taken

    def allow(self, key: str) -> bool:
        now = self._clock()
        start, count = self._windows.get(key, (now, 0))
        if now - start >= self.interval_s:
            start, count = now, 0
        if count >= self.burst:
            self.suppressed[key] += 1
            return False
        if len(self._windows) >= MAX_KEYS and key not in self._windows:
            self._windows.clear()
        self._windows[key] = (start, count + 1)
        return True

    def take_suppressed(self, key: str) -> int:
        """How many calls for ``key`` were refused since the last time this was asked."""
        return self.suppressed.pop(key, 0)


def error_replies(clock: Callable[[], float] = time.monotonic) -> Throttle:
    """The one policy for answering a peer's bad messages: a few error envelopes per interval."""
    return Throttle(ERROR_REPLY_BURST, ERROR_REPLY_INTERVAL_S, clock)
