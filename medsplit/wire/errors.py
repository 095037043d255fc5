"""Everything that can be wrong with bytes that arrive from the network, one type each.

Decoding untrusted bytes raises only subclasses of ``WireError``; a property-based test holds
the decoder to that. Receivers catch ``WireError``, count it by type, log it and go on: a bad
message never takes a process down.
"""

from __future__ import annotations


class WireError(Exception):
    """Base class: the message could not be accepted. ``str(err)`` says why."""


class BadMagic(WireError):
    """The frame does not start with medsplit's magic bytes (not one of our messages)."""


class UnsupportedVersion(WireError):
    """The frame's schema version is one this build cannot read."""


class TruncatedFrame(WireError):
    """The frame is shorter than its own length fields say."""


class MalformedHeader(WireError):
    """The header is not valid JSON or does not match the header schema."""


class MalformedPayload(WireError):
    """The (reassembled) payload is not a valid safetensors buffer."""


class ChecksumMismatch(WireError):
    """The payload's digest (xxh3-128) or size differs from the header's."""


class PayloadTooLarge(WireError):
    """The payload exceeds the configured message size limit."""


class TensorSpecMismatch(WireError):
    """A tensor is missing, unexpected, or has another dtype or shape than the receiver expects."""


class NonFiniteTensor(WireError):
    """A floating-point tensor holds NaN or Inf (or would, once down-cast for the wire)."""


class ReassemblyTimeout(WireError):
    """Some chunks of a message never arrived within the reassembly timeout."""

    topic = ""  # the topic its chunks came on, when the receiver knows its sender


class ReassemblyOverflow(WireError):
    """Buffering this message's chunks would exceed the reassembly memory bound."""


class BadMeta(WireError):
    """A header's ``meta`` does not match its kind's schema (a wrong type, a non-finite or
    out-of-range number, an unknown field)."""


class UnexpectedKind(WireError):
    """A kind the receiver does not take here (unknown, or not used in the job's mode)."""


class RetainedMessage(WireError):
    """A peer published with the retain flag: the protocol retains nothing but presence."""
