"""Property-based: whatever bytes arrive, the decoder answers only with its own typed errors."""

from __future__ import annotations

import contextlib
import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medsplit import wire
from medsplit.wire import Decoder, Envelope, TensorSpec, WireError, WireLimits, encode

LIMITS = WireLimits(max_frame_bytes=4096, max_message_bytes=1 << 20)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _sample_envelope() -> Envelope:
    generator = torch.Generator().manual_seed(3)
    return Envelope(
        "job-1",
        "site-a",
        "activations",
        round=1,
        step=2,
        tensors={
            "x": torch.randn(40, 30, generator=generator),
            "labels": torch.randint(0, 2, (40,), generator=generator),
            "h": torch.randn(8, generator=generator).to(torch.bfloat16),
        },
        meta={"samples": 40},
        msg_id="0123456789abcdef0123456789abcdef",
        sent_at=1.0,
    )


VALID_FRAMES = encode(_sample_envelope(), limits=LIMITS, wire_dtype="float16", cast={"x"})
SINGLE_FRAME = encode(_sample_envelope())[0]
VALID_PAYLOAD, _ = wire.encode_tensors(_sample_envelope().tensors)
# With an 8-bit tensor and its scales: the fuzzer reaches the dequantisation checks too.
QUANTISED_PAYLOAD, _ = wire.encode_tensors(_sample_envelope().tensors, "int8", {"x"})
SPECS = {
    "x": TensorSpec(torch.float32, (None, 30)),
    "labels": TensorSpec(torch.int64, (None,)),
    "h": TensorSpec(torch.bfloat16, (8,)),
}


def _feed_all(frames: list[bytes], expect: bool = False) -> None:
    decoder = Decoder(
        LIMITS, expected_for=(lambda header: SPECS) if expect else None, max_buffered_bytes=1 << 16
    )
    for frame in frames:
        # WireError is the only acceptable failure; anything else propagates and fails the test.
        with contextlib.suppress(WireError):
            decoder.feed(frame)
    for error in decoder.expire():
        assert isinstance(error, WireError)


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            data[at : at + 8] = draw(st.binary(min_size=8, max_size=8))
    return bytes(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    _feed_all([data])


@FUZZ
@given(st.binary(max_size=512))
def test_valid_prefix_then_random_bytes(tail: bytes) -> None:
    _feed_all([SINGLE_FRAME[:10] + tail, wire.MAGIC + tail])


@FUZZ
@given(mutated(SINGLE_FRAME))
def test_mutated_single_frame(data: bytes) -> None:
    _feed_all([data], expect=True)


@FUZZ
@given(st.lists(st.sampled_from(range(len(VALID_FRAMES))), max_size=30), st.data())
def test_mutated_chunk_sequences(order: list[int], data: st.DataObject) -> None:
    frames = [VALID_FRAMES[i] for i in order]
    frames = [data.draw(mutated(f)) if data.draw(st.booleans()) else f for f in frames]
    _feed_all(frames, expect=True)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["job", "site", "kind", "round", "step", "msg_id", "chunk", "chunks",
                         "size", "digest", "sent_at", "meta", "cast", "extra"]),
        json_values,
    )
)  # fmt: skip
def test_random_header_fields(overrides: dict[str, object]) -> None:
    header = json.loads(wire.unpack_frame(SINGLE_FRAME).header.to_json())
    header.update(overrides)
    try:
        raw = json.dumps(header).encode()
    except ValueError:
        return
    _feed_all([wire.pack_frame(raw[: 64 * 1024], SINGLE_FRAME[-100:])], expect=True)


@FUZZ
@given(
    st.sampled_from([VALID_PAYLOAD, QUANTISED_PAYLOAD]).flatmap(mutated),
    st.dictionaries(
        st.sampled_from(["x", "labels", "h", "q"]), st.sampled_from(["float32", "float64"])
    ),
)
def test_mutated_payload_with_matching_checksum(payload: bytes, cast: dict[str, str]) -> None:
    """Reaches the safetensors decoder and the cast/spec checks, past the checksum."""
    header = {
        "job": "job-1", "site": "site-a", "kind": "activations", "round": 0, "step": 0,
        "msg_id": "cd" * 16, "chunk": 0, "chunks": 1, "size": len(payload),
        "digest": wire.payload_digest([payload]), "sent_at": 1.0, "meta": {}, "cast": cast,
    }  # fmt: skip
    frame = wire.pack_frame(json.dumps(header).encode(), payload)
    _feed_all([frame], expect=True)
    _feed_all([frame], expect=False)
