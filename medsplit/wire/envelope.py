"""The envelope every medsplit message travels in, and its encoding into frames.

``encode`` turns an ``Envelope`` into one or more frames no larger than ``max_frame_bytes``;
``Decoder.feed`` takes frames in any order (duplicates included) and hands back each envelope
once all its chunks are in, verified. Both sides share ``WireLimits``.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError

from medsplit.modes import WireDtype
from medsplit.wire.errors import ChecksumMismatch, PayloadTooLarge
from medsplit.wire.frame import PREFIX_BYTES, Header, MetaValue, pack_frame
from medsplit.wire.tensors import (
    TensorSpec,
    check_tensors,
    decode_tensors,
    encode_tensors,
)

# Well under EMQX's default 1 MiB packet limit. Measured with raw frames through Mosquitto on
# loopback, 1 MB in 256 KiB frames takes ~3.5 ms one way against ~9 ms as one 1 MiB frame: the
# broker forwards early frames while later ones are still arriving, and paho's receive path
# (several copies per packet) handles small packets better.
DEFAULT_MAX_FRAME_BYTES = 256 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024 * 1024


def new_message_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class WireLimits:
    """Size limits shared by senders and receivers.

    ``max_frame_bytes`` bounds one MQTT payload (chunk size); ``max_message_bytes`` bounds a
    whole reassembled payload; a receiver refuses anything larger before buffering it.
    """

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if self.max_frame_bytes < 4096:
            raise ValueError(f"max_frame_bytes must be at least 4096, got {self.max_frame_bytes}")
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be positive, got {self.max_message_bytes}")


@dataclass(frozen=True)
class Envelope:
    """One logical message: routing fields, small metadata and named tensors."""

    job: str
    site: str
    kind: str
    round: int = 0
    step: int = 0
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    meta: Mapping[str, MetaValue] = field(default_factory=dict)
    msg_id: str = field(default_factory=new_message_id)
    sent_at: float = field(default_factory=time.time)
    reply_to: str | None = None  # the msg_id of the request this answers

    def reply(
        self,
        sender: str,
        kind: str,
        *,
        tensors: Mapping[str, torch.Tensor] | None = None,
        meta: Mapping[str, MetaValue] | None = None,
    ) -> Envelope:
        """An answer from ``sender`` to this message: same job, round and step, correlated."""
        return Envelope(
            self.job,
            sender,
            kind,
            round=self.round,
            step=self.step,
            tensors=dict(tensors or {}),
            meta=dict(meta or {}),
            reply_to=self.msg_id,
        )

    def error(self, sender: str, error: str, detail: str, **meta: MetaValue) -> Envelope:
        """The ``error`` answer to this message: what went wrong (a class name) and why."""
        return self.reply(sender, "error", meta={"error": error, "detail": detail[:500], **meta})

    def payload_nbytes(self) -> int:
        """Logical tensor bytes (before any wire down-casting)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def encode(
    envelope: Envelope,
    *,
    wire_dtype: WireDtype = "float32",
    cast: Collection[str] | None = None,
    limits: WireLimits = WireLimits(),
) -> list[bytes]:
    """Encode an envelope into frames of at most ``limits.max_frame_bytes`` each.

    Raises ``PayloadTooLarge`` for a payload over ``limits.max_message_bytes``, ``NonFiniteTensor``
    for NaN/Inf, and ``ValueError`` for invalid routing fields (a programming error).
    """
    payload, restored = encode_tensors(envelope.tensors, wire_dtype, cast)
    if len(payload) > limits.max_message_bytes:
        raise PayloadTooLarge(
            f"payload of {len(payload)} bytes exceeds max_message_bytes={limits.max_message_bytes}"
        )
    fields: dict[str, Any] = {
        "job": envelope.job,
        "site": envelope.site,
        "kind": envelope.kind,
        "round": envelope.round,
        "step": envelope.step,
        "msg_id": envelope.msg_id,
        "reply_to": envelope.reply_to,
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "sent_at": envelope.sent_at,
        "meta": dict(envelope.meta),
        "cast": restored,
    }
    try:
        first = Header(**fields, chunk=0, chunks=1)
    except ValidationError as exc:
        raise ValueError(f"invalid envelope: {exc}") from None
    header_json = first.to_json()
    if len(payload) + len(header_json) + PREFIX_BYTES <= limits.max_frame_bytes:
        return [pack_frame(header_json, payload)]
    # Chunk numbers of up to 9 digits each widen the header by at most 16 bytes.
    room = limits.max_frame_bytes - PREFIX_BYTES - len(header_json) - 16
    if room < 1024:
        raise ValueError(f"max_frame_bytes={limits.max_frame_bytes} leaves no room for the payload")
    count = -(-len(payload) // room)
    view = memoryview(payload)
    return [
        pack_frame(
            first.model_copy(update={"chunk": i, "chunks": count}).to_json(),
            view[i * room : (i + 1) * room],
        )
        for i in range(count)
    ]


def open_payload(
    header: Header,
    payload: bytes,
    expected: Mapping[str, TensorSpec] | None = None,
    limits: WireLimits = WireLimits(),
) -> Envelope:
    """Verify a complete payload against its header and decode it into an envelope."""
    if header.size > limits.max_message_bytes:
        raise PayloadTooLarge(
            f"message of {header.size} bytes exceeds max_message_bytes={limits.max_message_bytes}"
        )
    if len(payload) != header.size:
        raise ChecksumMismatch(f"payload is {len(payload)} bytes, header says {header.size}")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != header.sha256:
        raise ChecksumMismatch(
            f"payload sha256 {digest[:16]}... differs from header {header.sha256[:16]}..."
        )
    tensors = decode_tensors(payload, header.cast)
    check_tensors(tensors, expected)
    return Envelope(
        job=header.job,
        site=header.site,
        kind=header.kind,
        round=header.round,
        step=header.step,
        tensors=tensors,
        meta=header.meta,
        msg_id=header.msg_id,
        sent_at=header.sent_at,
        reply_to=header.reply_to,
    )
