"""The frame: magic, schema version, a JSON header, and one chunk of the payload.

Layout (big-endian)::

    0   4   magic  b"MSPL"
    4   2   schema version
    6   4   header length H (at most MAX_HEADER_BYTES)
    10  H   header, UTF-8 JSON matching ``Header``
    10+H    payload chunk (the rest of the frame)

The header is JSON rather than a binary struct because it is tiny next to the tensors, it is
readable in a broker's debug log, and pydantic validates it field by field with useful errors.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from medsplit.ids import ID_PATTERN, KIND_PATTERN
from medsplit.wire.errors import (
    BadMagic,
    ChecksumMismatch,
    MalformedHeader,
    TruncatedFrame,
    UnsupportedVersion,
)

MAGIC = b"MSPL"
# 2: the payload's digest is xxh3-128 (``digest``), no longer sha256.
SCHEMA_VERSION = 2
MAX_HEADER_BYTES = 64 * 1024
_PREFIX = struct.Struct(">4sHI")
PREFIX_BYTES = _PREFIX.size

MetaValue = str | int | float | bool | None
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Kind = Annotated[str, StringConstraints(pattern=KIND_PATTERN)]


class Header(BaseModel):
    """Everything a receiver needs to route, de-duplicate, reassemble and verify a message."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    job: Id
    site: Id
    kind: Kind
    round: int = Field(ge=0)
    step: int = Field(ge=0)
    msg_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    reply_to: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")] | None = Field(
        None, description="msg_id of the request this message answers (request/reply)"
    )
    chunk: int = Field(ge=0)
    chunks: int = Field(ge=1)
    size: int = Field(ge=0, description="bytes of the whole payload")
    digest: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")] = Field(
        description="xxh3-128 of the whole payload: catches corruption, not forgery (TLS's job)"
    )
    sent_at: float = Field(ge=0)
    meta: dict[Annotated[str, StringConstraints(max_length=64)], MetaValue] = Field(
        default_factory=dict, max_length=64
    )
    cast: dict[str, Annotated[str, StringConstraints(pattern=r"^float(32|64)$")]] = Field(
        default_factory=dict, description="tensor name -> dtype it had before wire down-casting"
    )

    @model_validator(mode="after")
    def _chunk_in_range(self) -> Header:
        if self.chunk >= self.chunks:
            raise ValueError(f"chunk index {self.chunk} is not below the chunk count {self.chunks}")
        return self

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(), separators=(",", ":"), allow_nan=False).encode()


# The chunk field as ``Header.to_json`` writes it. In that canonical JSON it is the first match:
# the fields before it are ids and numbers, which cannot hold a quote, and meta and cast (free
# text) come after it.
_CHUNK_FIELD = re.compile(rb'"chunk":(0|[1-9][0-9]{0,8}),')


def renumbered(header_json: bytes, chunk: int) -> bytes:
    """Chunk 0's canonical header bytes as chunk ``chunk``'s: the sender serialises once."""
    return header_json.replace(b'"chunk":0,', b'"chunk":%d,' % chunk, 1)


def chunk_of(header_json: bytes) -> tuple[int, bytes] | None:
    """The chunk index in header bytes, and the bytes renumbered as chunk 0 (the inverse of
    ``renumbered``); None when there is no chunk field in the canonical form."""
    match = _CHUNK_FIELD.search(header_json)
    if match is None:
        return None
    return int(match[1]), header_json[: match.start()] + b'"chunk":0,' + header_json[match.end() :]


@dataclass(frozen=True)
class Frame:
    """A parsed frame. ``chunk`` is a view into the received bytes: no copy until reassembly."""

    header: Header
    chunk: memoryview


def pack_frame(header_json: bytes, *chunk: bytes | memoryview) -> bytes:
    """One frame: the prefix, the header, then the chunk's pieces, in one copy."""
    if len(header_json) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(header_json)} bytes exceeds {MAX_HEADER_BYTES}")
    return b"".join((_PREFIX.pack(MAGIC, SCHEMA_VERSION, len(header_json)), header_json, *chunk))


def split_frame(data: bytes) -> tuple[memoryview, memoryview]:
    """A frame's header bytes and its chunk, after checking the prefix; ``WireError`` only."""
    if len(data) < PREFIX_BYTES:
        if not MAGIC.startswith(bytes(data[:4])):
            raise BadMagic(f"not a medsplit frame: starts with {bytes(data[:4])!r}")
        raise TruncatedFrame(
            f"frame of {len(data)} bytes is shorter than the {PREFIX_BYTES}-byte prefix"
        )
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise BadMagic(f"not a medsplit frame: starts with {magic!r}, expected {MAGIC!r}")
    if version != SCHEMA_VERSION:
        raise UnsupportedVersion(
            f"schema version {version}; this build reads version {SCHEMA_VERSION}"
        )
    if header_len > MAX_HEADER_BYTES:
        raise MalformedHeader(f"header length {header_len} exceeds the limit of {MAX_HEADER_BYTES}")
    end = PREFIX_BYTES + header_len
    if len(data) < end:
        raise TruncatedFrame(f"frame of {len(data)} bytes ends inside its {header_len}-byte header")
    view = memoryview(data)
    return view[PREFIX_BYTES:end], view[end:]


def parse_header(raw: memoryview | bytes) -> Header:
    """A header from its JSON bytes, validated field by field; ``MalformedHeader`` otherwise."""
    try:
        return Header.model_validate(json.loads(bytes(raw).decode("utf-8")))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # json.JSONDecodeError and pydantic.ValidationError are both ValueErrors.
        reason = exc.errors(include_url=False) if isinstance(exc, ValidationError) else exc
        raise MalformedHeader(f"invalid header: {reason}") from None


def check_chunk(header: Header, chunk: memoryview) -> None:
    if len(chunk) > header.size:
        raise ChecksumMismatch(
            f"chunk of {len(chunk)} bytes is larger than the whole payload ({header.size} bytes)"
        )


def unpack_frame(data: bytes) -> Frame:
    """Parse one frame from untrusted bytes; raises only ``WireError`` subclasses."""
    raw, chunk = split_frame(data)
    header = parse_header(raw)
    check_chunk(header, chunk)
    return Frame(header, chunk)
