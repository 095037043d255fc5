"""The aggregator's open requests: one per site, re-sent until answered, never amplified.

Every request (``train``, ``evaluate``, ``stats-request``, ``finish``) not answered within
``waits.retry_interval_s`` is published again with the *same* message id, at doubling intervals
up to a ceiling: the site answers a request once, and re-sends its answer to a repeat.

A site can make the aggregator ask again without waiting: a ``hello`` from a new agent
process (incarnation) re-issues what that site was asked, since the old process took the
request with it. A hostile holder of the site's certificate could send a thousand such hellos
a second and have the whole model sent down a thousand times. So a re-issue of the same request
(same kind, same round) counts as a repeat of it: it replaces the pending one and goes out when
the next repeat would have, with the same doubling. A site that keeps "restarting" gets its
request no more often than one that never answers (``max_sends``); one that really restarted
after a while gets it at once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from medsplit.channel import next_retry
from medsplit.wire import Envelope


@dataclass
class OpenRequest:
    """The open request to one site, re-sent until it is answered."""

    envelope: Envelope
    sent_at: float  # when this request (or the one it replaced) was last published
    next_at: float
    interval: float
    deferred: bool = False  # not published yet: it goes out at next_at


class OpenRequests:
    def __init__(self, retry_interval_s: float, clock: Callable[[], float]) -> None:
        self.retry_interval_s = retry_interval_s
        self.clock = clock
        self._open: dict[str, OpenRequest] = {}
        self.deferred = 0  # re-issues held back to one per retry interval

    def open(self, site: str, envelope: Envelope) -> bool:
        """Make ``envelope`` the open request to ``site``; whether to publish it now.

        A re-issue of the request already open (same kind and round) takes that request's
        place in its schedule of repeats: it is published now only if a repeat is due, and
        otherwise when the repeat would have been (``due``)."""
        now, retry = self.clock(), self.retry_interval_s
        previous = self._open.get(site)
        same = previous is not None and (previous.envelope.kind, previous.envelope.round) == (
            envelope.kind,
            envelope.round,
        )
        if previous is None or not same:
            self._open[site] = OpenRequest(envelope, now, now + retry, retry)
            return True
        if now < previous.next_at:
            self._open[site] = OpenRequest(
                envelope, previous.sent_at, previous.next_at, previous.interval, deferred=True
            )
            self.deferred += 1
            return False
        interval = next_retry(previous.interval, retry)  # it is the repeat that was due
        self._open[site] = OpenRequest(envelope, now, now + interval, interval)
        return True

    def get(self, site: str) -> OpenRequest | None:
        return self._open.get(site)

    def answered_by(self, site: str, envelope: Envelope) -> OpenRequest | None:
        """The request open with ``site`` if ``envelope`` answers it, else None."""
        request = self._open.get(site)
        if request is not None and envelope.reply_to == request.envelope.msg_id:
            return request
        return None

    def working(self, site: str) -> None:
        """The site is visibly working on its request: no need to send it again yet."""
        request = self._open.get(site)
        if request is not None:
            request.next_at = self.clock() + request.interval

    def due(
        self, waiting: Collection[str], reachable: Callable[[str], bool]
    ) -> list[tuple[str, OpenRequest, bool]]:
        """The requests to publish now, each with whether it is a repeat of one that got no
        answer (or a deferred re-issue going out); requests nobody waits for any more are
        closed. Either way the interval to the next one doubles, up to its ceiling."""
        now = self.clock()
        out = []
        for site in list(self._open):
            request = self._open[site]
            if site not in waiting:
                del self._open[site]
            elif now >= request.next_at and reachable(site):
                request.interval = next_retry(request.interval, self.retry_interval_s)
                request.sent_at, request.next_at = now, now + request.interval
                out.append((site, request, not request.deferred))
                request.deferred = False
        return out


def max_sends(duration_s: float, retry_interval_s: float) -> int:
    """How many times one request can go out within ``duration_s`` of its first send, however
    often its site restarts: the first send and the repeats of the doubling schedule."""
    sends, elapsed, interval = 1, 0.0, retry_interval_s
    while elapsed + interval <= duration_s:
        elapsed += interval
        sends += 1
        interval = next_retry(interval, retry_interval_s)
    return sends
