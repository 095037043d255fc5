"""The wire format: one envelope for every message, safetensors for tensors, never pickle.

Send: ``encode(Envelope(...)) -> list[bytes]`` (one frame per MQTT publish).
Receive: ``Decoder().feed(frame) -> Envelope | None`` (None until the last chunk is in).
Every decoding failure is a ``WireError`` subclass; see ``medsplit.wire.errors``."""

from typing import TYPE_CHECKING

from medsplit.lazy import lazy_exports

if TYPE_CHECKING:
    from medsplit.modes import WireDtype
    from medsplit.wire.envelope import (
        DEFAULT_MAX_FRAME_BYTES,
        DEFAULT_MAX_MESSAGE_BYTES,
        Envelope,
        WireLimits,
        encode,
        new_message_id,
        open_payload,
        payload_digest,
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
        RetainedMessage,
        TensorSpecMismatch,
        TruncatedFrame,
        UnsupportedVersion,
        WireError,
    )
    from medsplit.wire.frame import MAGIC, SCHEMA_VERSION, Frame, Header, pack_frame, unpack_frame
    from medsplit.wire.reassembly import Decoder, Reassembler
    from medsplit.wire.tensors import (
        TensorSpec,
        check_tensors,
        decode_tensors,
        encode_tensors,
        prepare_tensors,
    )

_EXPORTS = {
    "BadMagic": "medsplit.wire.errors",
    "ChecksumMismatch": "medsplit.wire.errors",
    "DEFAULT_MAX_FRAME_BYTES": "medsplit.wire.envelope",
    "DEFAULT_MAX_MESSAGE_BYTES": "medsplit.wire.envelope",
    "Decoder": "medsplit.wire.reassembly",
    "Envelope": "medsplit.wire.envelope",
    "Frame": "medsplit.wire.frame",
    "Header": "medsplit.wire.frame",
    "MAGIC": "medsplit.wire.frame",
    "MalformedHeader": "medsplit.wire.errors",
    "MalformedPayload": "medsplit.wire.errors",
    "NonFiniteTensor": "medsplit.wire.errors",
    "PayloadTooLarge": "medsplit.wire.errors",
    "Reassembler": "medsplit.wire.reassembly",
    "ReassemblyOverflow": "medsplit.wire.errors",
    "ReassemblyTimeout": "medsplit.wire.errors",
    "RetainedMessage": "medsplit.wire.errors",
    "SCHEMA_VERSION": "medsplit.wire.frame",
    "TensorSpec": "medsplit.wire.tensors",
    "TensorSpecMismatch": "medsplit.wire.errors",
    "TruncatedFrame": "medsplit.wire.errors",
    "UnsupportedVersion": "medsplit.wire.errors",
    "WireDtype": "medsplit.modes",
    "WireError": "medsplit.wire.errors",
    "WireLimits": "medsplit.wire.envelope",
    "check_tensors": "medsplit.wire.tensors",
    "decode_tensors": "medsplit.wire.tensors",
    "encode": "medsplit.wire.envelope",
    "encode_tensors": "medsplit.wire.tensors",
    "new_message_id": "medsplit.wire.envelope",
    "open_payload": "medsplit.wire.envelope",
    "payload_digest": "medsplit.wire.envelope",
    "prepare_tensors": "medsplit.wire.tensors",
    "pack_frame": "medsplit.wire.frame",
    "unpack_frame": "medsplit.wire.frame",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
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
    "RetainedMessage",
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
    "payload_digest",
    "prepare_tensors",
    "unpack_frame",
]
