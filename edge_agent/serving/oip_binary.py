"""The Open Inference Protocol's binary tensor data extension, on REST.

A request whose ``Inference-Header-Content-Length`` header says N carries its JSON in the first
N bytes of the body and tensor data after it: each input with ``parameters.binary_data_size``
takes that many bytes, in order. An answer does the same for outputs asked for with
``parameters.binary_data`` (or all of them with the request's ``binary_data_output``).
Numbers are little-endian; a BYTES tensor is its elements, each a 4-byte little-endian length
and the bytes (what tritonclient and Triton write).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

HEADER = "Inference-Header-Content-Length"


class BinaryError(ValueError):
    """Binary data that does not add up; the message says where."""


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON part and the binary part of a request body."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise BinaryError(
            f"{HEADER}: {header_length!r} is not a length within the {len(body)}-byte body"
        )
    size = int(header_length)
    return body[:size], body[size:]


class Blobs:
    """The binary part of a request, handed out to the inputs that declare a size, in order."""

    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    def take(self, tensor: Mapping[str, Any]) -> bytes | None:
        """This input's bytes, or None when it carries its data in JSON."""
        parameters = tensor.get("parameters")
        size = parameters.get("binary_data_size") if isinstance(parameters, Mapping) else None
        if size is None:
            return None
        if not isinstance(size, int) or size < 0 or self.offset + size > len(self.data):
            raise BinaryError(
                f"{tensor.get('name')}: binary_data_size {size!r} is more than the "
                f"{len(self.data) - self.offset} bytes left after the JSON"
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def check_used(self) -> None:
        if self.offset != len(self.data):
            raise BinaryError(
                f"{len(self.data) - self.offset} bytes after the JSON belong to no input"
            )


def bytes_elements(data: bytes, where: str) -> list[bytes]:
    """A BYTES tensor's elements from their length-prefixed form."""
    elements, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise BinaryError(f"{where}: a length prefix is cut off at byte {offset}")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise BinaryError(f"{where}: element of {length} bytes runs past the data")
        elements.append(data[offset : offset + length])
        offset += length
    return elements
