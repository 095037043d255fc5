"""The wire format: one envelope for every message, safetensors for tensors, never pickle.

Send: ``encode(Envelope(...)) -> list[bytes]`` (one frame per MQTT publish).
Receive: ``Decoder().feed(frame) -> Envelope | None`` (None until the last chunk is in).
Every decoding failure is a ``WireError`` subclass; see ``medsplit.wire.errors``.
"""

from medsplit.wire.envelope import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    Envelope,
    WireLimits,
    encode,
    new_message_id,
    open_payload,
)
from medsplit.wire.errors import (
    BadMagic,
    ChecksumMismatch,
    MalformedHeader,
    MalformedPayload,
    NonFiniteTensor,
    PayloadTooLarge,
    ReassemblyOverflow,
    ReassemblyTimeout,
    TensorSpecMismatch,
    TruncatedFrame,
    UnsupportedVersion,
    WireError,
)
from medsplit.wire.frame import MAGIC, SCHEMA_VERSION, Frame, Header, pack_frame, unpack_frame
from medsplit.wire.reassembly import Decoder, Reassembler
from medsplit.wire.tensors import (
    TensorSpec,
    WireDtype,
    check_tensors,
    decode_tensors,
    encode_tensors,
)

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAGIC",
    "SCHEMA_VERSION",
    "BadMagic",
    "ChecksumMismatch",
    "Decoder",
    "Envelope",
    "Frame",
    "Header",
    "MalformedHeader",
    "MalformedPayload",
    "NonFiniteTensor",
    "PayloadTooLarge",
    "Reassembler",
    "ReassemblyOverflow",
    "ReassemblyTimeout",
    "TensorSpec",
    "TensorSpecMismatch",
    "TruncatedFrame",
    "UnsupportedVersion",
    "WireDtype",
    "WireError",
    "WireLimits",
    "check_tensors",
    "decode_tensors",
    "encode",
    "encode_tensors",
    "new_message_id",
    "open_payload",
    "pack_frame",
    "unpack_frame",
]
