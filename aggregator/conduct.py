"""What the aggregator counts and limits about its sites' conduct, apart from the job's rules.

A member of the federation holds a valid certificate and can send anything its topics take.
The job's state machine decides what a message means; this keeps the tallies and limits that
make a misbehaving member visible and cheap (docs/security.md, "a member turns hostile"):

* refusals: answers a step waited for that were refused, by reason and by site;
* dropped events: events the state machine failed on (a bug), dropped so that the job goes on;
* hellos: taken at most ``HELLO_BURST`` per ``HELLO_INTERVAL_S`` from one site, since each one
  is answered (a setup, and for a "restarted" agent what it was asked), and answering a flood
  would turn what a site sends into more of what it gets;
* log lines about one site or one kind of event: a few per interval, the rest counted.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from medsplit.channel import LOG_BURST, LOG_INTERVAL_S
from medsplit.throttle import Throttle

log = logging.getLogger("aggregator.coordinator")
HELLO_BURST, HELLO_INTERVAL_S = 3, 10.0  # hellos taken from one site per interval


class Conduct:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.refusals: Counter[str] = Counter()  # by reason
        self.refused_from: Counter[str] = Counter()  # by site
        self.dropped_events: Counter[str] = Counter()  # by event type
        self._hellos = Throttle(HELLO_BURST, HELLO_INTERVAL_S, clock)
        self._lines = Throttle(LOG_BURST, LOG_INTERVAL_S, clock)

    def hello_taken(self, site: str) -> bool:
        """Whether a hello of ``site`` is taken now (False: it is over its rate)."""
        return self._hellos.allow(site)

    def refused(self, site: str, reason: str, detail: str) -> None:
        self.refusals[reason] += 1
        self.refused_from[site] += 1
        if self._lines.allow(f"refusal {site}"):
            log.warning("refused %s's answer (%s): %s", site, reason, detail)

    def dropped(self, event: object, site: str, exc: Exception) -> None:
        """The state machine raised on ``event``: it is dropped, counted and said."""
        name = type(event).__name__
        self.dropped_events[name] += 1
        if self._lines.allow(f"event {name}"):
            log.error(
                "dropped %s from %s: the job's state machine failed on it (%s: %s); the job "
                "goes on without it",
                name,
                site,
                type(exc).__name__,
                exc,
            )
        log.debug("state machine failure on %s", event, exc_info=exc)

    def say(self, key: str, message: str, *args: object) -> None:
        """A warning, at most a few per interval for one ``key`` (a site, a kind of event)."""
        if self._lines.allow(key):
            log.warning(message, *args)
