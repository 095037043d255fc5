"""Every broker refusal medsplit can meet, in one table: MQTT 5 reason code -> what it means.

paho reports refusals as reason codes (CONNACK, PUBACK, SUBACK, DISCONNECT; MQTT 3.1.1's
CONNACK return codes arrive converted to their MQTT 5 equivalents). The transport turns each
into its own exception through this table and keeps the code on the exception, so callers tell
an ACL refusal (``NOT_AUTHORIZED``, permanent: retrying cannot help) from a transient failure
(``SERVER_UNAVAILABLE``: retry with backoff) by number, never by matching message text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reason:
    code: int
    name: str
    permanent: bool  # True: retrying the same request cannot succeed


UNSPECIFIED = 0x80
NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86
SERVER_UNAVAILABLE = 0x88
PACKET_TOO_LARGE = 0x95

REASONS: dict[int, Reason] = {
    r.code: r
    for r in (
        Reason(0x80, "unspecified error", False),
        Reason(0x81, "malformed packet", True),
        Reason(0x82, "protocol error", True),
        Reason(0x83, "implementation specific error", False),
        Reason(0x84, "unsupported protocol version", True),
        Reason(0x85, "client identifier not valid", True),
        Reason(BAD_CREDENTIALS, "bad user name or password", True),
        Reason(NOT_AUTHORIZED, "not authorized", True),
        Reason(SERVER_UNAVAILABLE, "server unavailable", False),
        Reason(0x89, "server busy", False),
        Reason(0x8A, "banned", True),
        Reason(0x8B, "server shutting down", False),
        Reason(0x8C, "bad authentication method", True),
        Reason(0x8D, "keep alive timeout", False),
        Reason(0x8E, "session taken over", False),
        Reason(0x8F, "topic filter invalid", True),
        Reason(0x90, "topic name invalid", True),
        Reason(0x91, "packet identifier in use", False),
        Reason(0x92, "packet identifier not found", False),
        Reason(0x93, "receive maximum exceeded", False),
        Reason(0x94, "topic alias invalid", True),
        Reason(PACKET_TOO_LARGE, "packet too large", True),
        Reason(0x96, "message rate too high", False),
        Reason(0x97, "quota exceeded", False),
        Reason(0x98, "administrative action", False),
        Reason(0x99, "payload format invalid", True),
        Reason(0x9A, "retain not supported", True),
        Reason(0x9B, "QoS not supported", True),
        Reason(0x9C, "use another server", True),
        Reason(0x9D, "server moved", True),
        Reason(0x9E, "shared subscriptions not supported", True),
        Reason(0x9F, "connection rate exceeded", False),
        Reason(0xA0, "maximum connect time", False),
        Reason(0xA1, "subscription identifiers not supported", True),
        Reason(0xA2, "wildcard subscriptions not supported", True),
    )
}


def reason(code: int) -> Reason:
    """The table's entry for ``code``; an unknown failure code is taken as transient."""
    return REASONS.get(code, Reason(code, f"reason code 0x{code:02X}", False))
