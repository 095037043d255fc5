"""One party's channel: envelopes over a transport, and presence beside them.

``Endpoint`` is what agents and the aggregator use. ``send`` encodes an envelope into frames and
publishes them pipelined, waiting for the broker's acknowledgements. ``receive`` pulls frames
from the transport, reassembles, drops redeliveries by message id, verifies, checks that the
header agrees with the topic it came on, and returns each message once. A bad message is
counted by error type in ``stats.rejected`` (and by topic branch in ``stats.rejected_from``),
logged -- at most ``LOG_BURST`` lines per branch every ``LOG_INTERVAL_S``, then one line saying
how many more -- and handed to ``on_reject``; it never raises out of ``receive``. Presence topics never reach the envelope decoder: their JSON is parsed on its own
and handed to ``on_presence`` (a malformed one is counted as ``BadPresence`` and dropped; nobody
is answered, since presence has no sender to answer).

Request and answer correlate by message id (``Envelope.reply_to``). A redelivered or re-sent
message (an id already received) is dropped. ``answer`` sends an answer *and keeps it* (the
newest ``kept_answers`` per topic, so that one busy peer cannot push out another's; at most
``MAX_ANSWER_TOPICS`` topics): when the request it answers comes again -- its sender never got the
answer, e.g. it was lost in a broker restart -- the endpoint sends the same answer again (at
most once per ``repeat_interval_s``), so a repeated request is never handled twice. A repeat
of anything else is handed to ``on_duplicate``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from medsplit import allocator
from medsplit.protocol import topics
from medsplit.protocol.presence import Presence, PresenceError
from medsplit.throttle import Throttle
from medsplit.transport.acks import Delivery
from medsplit.transport.base import Inbound, Transport, TransportError
from medsplit.transport.inbox import branch
from medsplit.wire import (
    Decoder,
    Envelope,
    Header,
    MalformedHeader,
    ReassemblyOverflow,
    RetainedMessage,
    WireDtype,
    WireError,
    WireLimits,
    encode,
)
from medsplit.wire.reassembly import ExpectedFor, HeaderCheck

log = logging.getLogger(__name__)

LOG_BURST, LOG_INTERVAL_S = 5, 10.0  # rejection log lines per sender (topic branch)
RETRY_CEILING = 8  # a request is repeated at most every 8 x its first retry interval
MAX_ANSWER_TOPICS = 4096  # topics answers are kept for (a topic is one peer's one kind)
RejectHandler = Callable[[str, WireError], None]
PresenceHandler = Callable[[str, Presence], None]
DuplicateHandler = Callable[[str, Header], None]


@dataclass
class EndpointStats:
    """Counters for metrics and reports; bytes are wire bytes (frames, headers included)."""

    sent_messages: int = 0
    sent_frames: int = 0
    sent_bytes: int = 0
    received_messages: int = 0
    received_frames: int = 0
    received_bytes: int = 0
    duplicates: int = 0
    answers_repeated: int = 0  # kept answers sent again to a repeated request
    rejected: Counter[str] = field(default_factory=Counter)  # by error type
    rejected_from: Counter[str] = field(default_factory=Counter)  # by topic branch
    # Wire bytes by (site or "all", direction, kind), from the topic each frame travelled on.
    traffic: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    # Seconds spent encoding and decoding, by "encode <kind>" / "decode <kind>"; a message's
    # decode counts all its chunks. "decode (rejected)" is the time spent on refused ones.
    codec_seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def codec_total(self) -> float:
        """Seconds spent encoding and decoding, all kinds together."""
        return sum(self.codec_seconds.values())

    def count(self, topic: str, nbytes: int) -> None:
        try:
            route = topics.parse(topic)
        except ValueError:
            return  # not a protocol topic: rejected (and counted) by the decoder, not traffic
        if route.kind is not None:
            self.traffic[(route.site or "all", route.direction, route.kind)] += nbytes


def next_retry(interval: float, first: float) -> float:
    """The wait before the next repeat of an unanswered request: doubling, up to a ceiling."""
    return min(interval * 2, first * RETRY_CEILING)


@dataclass
class _Kept:
    """An answer sent, kept for a repeat of its request."""

    topic: str
    envelope: Envelope
    wire_dtype: WireDtype
    cast: Collection[str] | None
    sent_at: float


@dataclass(frozen=True)
class Received:
    topic: str
    envelope: Envelope


def _check_route(topic: str, envelope: Envelope) -> None:
    """The header must agree with the topic; the broker's ACL vouches only for the topic."""
    try:
        route = topics.parse(topic)
    except ValueError:
        return  # not a protocol topic (e.g. a benchmark's); nothing to cross-check
    if route.job != envelope.job:
        raise MalformedHeader(f"header job {envelope.job!r} differs from topic job {route.job!r}")
    if route.direction == "up" and route.site != envelope.site:
        raise MalformedHeader(
            f"header site {envelope.site!r} differs from topic site {route.site!r}"
        )
    if route.kind is not None and route.kind != envelope.kind:
        raise MalformedHeader(
            f"header kind {envelope.kind!r} differs from topic kind {route.kind!r}"
        )


class Endpoint:
    def __init__(
        self,
        transport: Transport,
        *,
        limits: WireLimits = WireLimits(),
        expected_for: ExpectedFor | None = None,
        reassembly_timeout_s: float = 60.0,
        max_buffered_bytes: int = 2 * 1024 * 1024 * 1024,
        dedup_window: int = 100_000,
        on_reject: RejectHandler | None = None,
        on_presence: PresenceHandler | None = None,
        kept_answers: int = 4,
        repeat_interval_s: float = 0.0,
    ) -> None:
        allocator.tune()  # message-sized buffers reused, not page-faulted in each time
        self.transport = transport
        self.limits = limits
        self.on_reject = on_reject
        self.on_presence = on_presence
        self.on_duplicate: DuplicateHandler | None = None
        # The aggregator's: refuse (and delete) what peers publish with the retain flag.
        self.refuse_retained = False
        self._release_due = False  # dropped buffers whose memory is still to be given back
        self.kept_answers = kept_answers
        self.repeat_interval_s = repeat_interval_s
        # By the msg_id of the request, and per topic to bound them one peer at a time.
        self._kept: dict[str, _Kept] = {}
        self._kept_by_topic: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()
        self.stats = EndpointStats()
        self._log_throttle = Throttle(LOG_BURST, LOG_INTERVAL_S)
        self._pending: list[Delivery] = []
        self._decoding = 0.0  # seconds on the chunks of messages not complete yet
        self._decoder = Decoder(
            limits,
            expected_for=expected_for,
            max_buffered_bytes=max_buffered_bytes,
            timeout_s=reassembly_timeout_s,
            dedup_window=dedup_window,
        )

    def set_expected(
        self, expected_for: ExpectedFor | None, check_header: HeaderCheck | None = None
    ) -> None:
        """Change the tensor specs incoming messages are checked against (e.g. after setup),
        and the receiver's own header check (``medsplit.protocol.meta.MessageRules``)."""
        self._decoder.expected_for = expected_for
        if check_header is not None:
            self._decoder.check_header = check_header

    def set_reassembly_timeout(self, seconds: float) -> None:
        """How long an incomplete message may wait for its next chunk before it is dropped."""
        self._decoder.reassembler.timeout_s = seconds

    def send(
        self,
        topic: str,
        envelope: Envelope,
        *,
        wire_dtype: WireDtype = "float32",
        cast: Collection[str] | None = None,
        wait: bool = True,
    ) -> int:
        """Publish ``envelope`` on ``topic``; returns the bytes put on the wire.

        A ``wire_dtype`` other than float32 down-casts (16-bit) or quantises (8-bit) the float
        tensors named in ``cast`` (all when None): use it for activations and gradients, never
        for weights. With ``wait=False`` it returns before the broker acknowledged the frames,
        so encoding the next message overlaps with sending this one, and a request's answer can
        arrive while the thread is already waiting for it instead of for an acknowledgement;
        ``flush()`` waits for every acknowledgement, and a refusal surfaces at the next
        ``send`` or ``flush``.
        """
        started = time.perf_counter()
        frames = encode(envelope, wire_dtype=wire_dtype, cast=cast, limits=self.limits)
        self.stats.codec_seconds[f"encode {envelope.kind}"] += time.perf_counter() - started
        delivery = self.transport.publish_all(topic, frames, wait=wait)
        if not wait:
            self._settle()
            self._pending.append(delivery)
        nbytes = sum(len(f) for f in frames)
        self.stats.sent_messages += 1
        self.stats.sent_frames += len(frames)
        self.stats.sent_bytes += nbytes
        self.stats.count(topic, nbytes)
        return nbytes

    def answer(
        self,
        topic: str,
        envelope: Envelope,
        *,
        wire_dtype: WireDtype = "float32",
        cast: Collection[str] | None = None,
        wait: bool = True,
    ) -> int:
        """Send the answer to the request ``envelope.reply_to`` and keep it for a repeat."""
        if envelope.reply_to is None:
            raise ValueError(
                f"an answer must name its request (reply_to); {envelope.kind} does not"
            )
        nbytes = self.send(topic, envelope, wire_dtype=wire_dtype, cast=cast, wait=wait)
        kept = _Kept(topic, envelope, wire_dtype, cast, time.monotonic())
        self._keep(envelope.reply_to, kept)
        return nbytes

    def _keep(self, request_id: str, kept: _Kept) -> None:
        ids = self._kept_by_topic.setdefault(kept.topic, OrderedDict())
        self._kept_by_topic.move_to_end(kept.topic)
        ids[request_id] = None
        self._kept[request_id] = kept
        while len(ids) > self.kept_answers:
            self._kept.pop(ids.popitem(last=False)[0], None)
        while len(self._kept_by_topic) > MAX_ANSWER_TOPICS:
            for old in self._kept_by_topic.popitem(last=False)[1]:
                self._kept.pop(old, None)

    def _settle(self) -> None:
        """Forget acknowledged deliveries; one the broker refused raises its error now."""
        pending, self._pending = self._pending, []
        refused: TransportError | None = None
        for delivery in pending:
            if not delivery.done:
                self._pending.append(delivery)
            elif refused is None:
                try:
                    delivery.wait()  # returns at once, or raises what went wrong
                except TransportError as exc:
                    refused = exc
        if refused is not None:
            raise refused

    def flush(self) -> None:
        """Wait until the broker acknowledged everything sent with ``wait=False``."""
        pending, self._pending = self._pending, []
        for delivery in pending:
            delivery.wait()

    def receive(self, timeout: float | None = None) -> Received | None:
        """The next valid message, or None when ``timeout`` seconds pass without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            expired = self._decoder.expire()
            self._release_memory(due=bool(expired))
            for error in expired:
                self._reject(error.topic or "<reassembly>", error)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            # Wake at least once a second so stalled reassemblies time out without traffic.
            wait = self._decoder.reassembler.timeout_s if remaining is None else remaining
            soon = self._decoder.reassembler.pending or self._release_due
            inbound = self.transport.receive(min(wait, 1.0) if soon else wait)
            if inbound is not None:
                received = self._accept(inbound)
                if received is not None:
                    return received
            elif deadline is not None and time.monotonic() >= deadline:
                return None

    def _release_memory(self, *, due: bool) -> None:
        """Abandoned buffers are not traffic to come: their memory goes back to the kernel,
        at once when no message is left half-built, else as the allocator's rate allows."""
        self._release_due = self._release_due or due
        if self._release_due:
            idle = not self._decoder.reassembler.pending
            self._release_due = not allocator.release(now=idle)

    def _accept(self, inbound: Inbound) -> Received | None:
        self.stats.received_frames += 1
        self.stats.received_bytes += len(inbound.payload)
        if topics.is_presence(inbound.topic):
            self._presence(inbound)
            return None
        if inbound.retained and self.refuse_retained:
            self._clear_retained(inbound)
            return None
        self.stats.count(inbound.topic, len(inbound.payload))
        started = time.perf_counter()
        try:
            envelope = self._decoder.feed(inbound.payload, branch(inbound.topic))
            if envelope is not None:
                _check_route(inbound.topic, envelope)
        except WireError as error:
            self.stats.codec_seconds["decode (rejected)"] += time.perf_counter() - started
            self._reject(inbound.topic, error)
            if isinstance(error, ReassemblyOverflow):  # a message's chunks were dropped
                self._release_due = True
            return None
        self._decoding += time.perf_counter() - started
        if envelope is not None:
            self.stats.codec_seconds[f"decode {envelope.kind}"] += self._decoding
            self._decoding = 0.0
        if self._decoder.duplicates != self.stats.duplicates:
            self.stats.duplicates = self._decoder.duplicates
            self._duplicate(inbound)
        if envelope is None:
            return None
        self.stats.received_messages += 1
        return Received(inbound.topic, envelope)

    def _clear_retained(self, inbound: Inbound) -> None:
        """A message a peer left on the broker (retained) is refused, and deleted there: the
        protocol retains nothing but presence, and the broker would keep and persist it."""
        if not inbound.payload:
            return  # the deletion itself, echoed back
        self._reject(inbound.topic, RetainedMessage(f"a retained message on {inbound.topic}"))
        try:
            self.transport.publish(inbound.topic, b"", retain=True)
        except TransportError as exc:  # e.g. an ACL from before this rule: it says so once
            if self._log_throttle.allow("clear retained"):
                log.warning("could not delete the retained message on %s: %s", inbound.topic, exc)

    def _presence(self, inbound: Inbound) -> None:
        if not inbound.payload:
            return  # a retained presence being cleared
        try:
            presence = Presence.from_bytes(inbound.payload)
        except PresenceError as exc:
            self.stats.rejected["BadPresence"] += 1
            log.warning("ignored presence on %s: %s", inbound.topic, exc)
            return
        if self.on_presence is not None:
            self.on_presence(inbound.topic, presence)

    def _duplicate(self, inbound: Inbound) -> None:
        header = self._decoder.last_duplicate
        if header is None or header.chunk != 0:  # once per message, not once per chunk
            return
        kept = self._kept.get(header.msg_id)
        if kept is not None:
            now = time.monotonic()
            if now - kept.sent_at >= self.repeat_interval_s:
                log.info("%s came again; sending the same %s", header.kind, kept.envelope.kind)
                kept.sent_at = now
                self.stats.answers_repeated += 1
                self.send(kept.topic, kept.envelope, wire_dtype=kept.wire_dtype, cast=kept.cast)
            return
        if self.on_duplicate is not None:
            _guarded(self.on_duplicate, inbound.topic, header)

    def _reject(self, topic: str, error: WireError) -> None:
        kind, sender = type(error).__name__, branch(topic)
        self.stats.rejected[kind] += 1
        self.stats.rejected_from[sender] += 1
        if self._log_throttle.allow(sender):
            more = self._log_throttle.take_suppressed(sender)
            also = f" ({more} more from there were not logged)" if more else ""
            log.warning("rejected message on %s: %s: %s%s", topic, kind, error, also)
        if self.on_reject is not None:
            _guarded(self.on_reject, topic, error)


def _guarded(handler: Callable[[str, Any], None], topic: str, detail: object) -> None:
    """Call a receiver's handler; a faulty one must not stop the receive loop."""
    try:
        handler(topic, detail)
    except Exception:
        log.exception("%s failed for a message on %s", getattr(handler, "__name__", handler), topic)
