from __future__ import annotations

import json
import struct

import pytest
import torch

from medsplit import wire
from medsplit.wire import (
    BadMagic,
    ChecksumMismatch,
    Decoder,
    Envelope,
    MalformedHeader,
    MalformedPayload,
    NonFiniteTensor,
    PayloadTooLarge,
    ReassemblyOverflow,
    TensorSpec,
    TensorSpecMismatch,
    TruncatedFrame,
    UnsupportedVersion,
    WireLimits,
    encode,
    unpack_frame,
)
from medsplit.wire.frame import PREFIX_BYTES

SMALL = WireLimits(max_frame_bytes=4096)
DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.float8_e4m3fn, torch.float8_e5m2,
]  # fmt: skip


def _roundtrip(envelope: Envelope, limits: WireLimits = WireLimits(), **kw: object) -> Envelope:
    decoder = Decoder(limits)
    result = None
    for frame in encode(envelope, limits=limits, **kw):  # type: ignore[arg-type]
        result = decoder.feed(frame) or result
    assert result is not None
    return result


def _env(**tensors: torch.Tensor) -> Envelope:
    return Envelope(
        "job-1",
        "site-a",
        "activations",
        round=2,
        step=5,
        tensors=tensors,
        meta={"n": 32, "tag": "x"},
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roundtrip_every_dtype_is_bit_identical(dtype: torch.dtype) -> None:
    source = torch.randn(3, 5, 7) * 4
    tensor = source.to(dtype) if dtype != torch.bool else source > 0
    out = _roundtrip(_env(t=tensor)).tensors["t"]
    assert out.dtype == dtype and out.shape == tensor.shape
    assert torch.equal(out.view(torch.uint8), tensor.view(torch.uint8))


def test_roundtrip_keeps_header_fields_and_meta() -> None:
    sent = _env(a=torch.ones(2), b=torch.zeros(0, 3))
    got = _roundtrip(sent)
    assert (got.job, got.site, got.kind, got.round, got.step) == (
        "job-1",
        "site-a",
        "activations",
        2,
        5,
    )
    assert got.msg_id == sent.msg_id and got.meta == {"n": 32, "tag": "x"}
    assert got.tensors["b"].shape == (0, 3)


def test_envelope_without_tensors() -> None:
    got = _roundtrip(Envelope("job-1", "site-a", "hello", meta={"samples": 120}))
    assert got.tensors == {} and got.meta == {"samples": 120}


def test_non_contiguous_and_scalar_tensors() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    got = _roundtrip(_env(t=base.t(), s=torch.tensor(3.5)))
    assert torch.equal(got.tensors["t"], base.t()) and got.tensors["s"].item() == 3.5


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_down_cast_travels_small_and_arrives_in_the_original_dtype(wire_dtype: str) -> None:
    x = torch.randn(64, 256)
    full = sum(len(f) for f in encode(_env(x=x)))
    frames = encode(_env(x=x), wire_dtype=wire_dtype)  # type: ignore[arg-type]
    assert sum(len(f) for f in frames) < 0.55 * full
    got = _roundtrip(_env(x=x), wire_dtype=wire_dtype).tensors["x"]
    assert got.dtype == torch.float32
    assert torch.allclose(got, x, rtol=1e-2, atol=1e-2)
    assert torch.equal(got, x.to(getattr(torch, wire_dtype)).float())


def test_down_cast_only_the_named_tensors() -> None:
    got = _roundtrip(
        _env(act=torch.randn(8), w=torch.randn(8) / 3), wire_dtype="float16", cast={"act"}
    )
    assert got.tensors["act"].dtype == torch.float32 and got.tensors["w"].dtype == torch.float32
    header = unpack_frame(
        encode(_env(act=torch.randn(8), w=torch.randn(8)), wire_dtype="float16", cast={"act"})[0]
    ).header
    assert header.cast == {"act": "float32"}


def test_fp16_overflow_is_refused_by_the_sender() -> None:
    with pytest.raises(NonFiniteTensor, match="down-casting to float16"):
        encode(_env(x=torch.tensor([1e6])), wire_dtype="float16")


def test_nan_and_inf_are_refused_by_sender_and_receiver() -> None:
    with pytest.raises(NonFiniteTensor, match="'x' has 1 NaN/Inf"):
        encode(_env(x=torch.tensor([1.0, float("nan")])))
    # A hostile or buggy sender that skips the check: the receiver refuses too.
    payload, _ = wire.encode_tensors({"x": torch.tensor([1.0])})
    bad_payload = payload.replace(struct.pack("<f", 1.0), struct.pack("<f", float("inf")))
    frame = _frame_with_payload(bad_payload)
    with pytest.raises(NonFiniteTensor):
        Decoder().feed(frame)


def _frame_with_payload(payload: bytes, **header_overrides: object) -> bytes:
    fields = {
        "job": "job-1", "site": "site-a", "kind": "update", "round": 0, "step": 0,
        "msg_id": "ab" * 16, "chunk": 0, "chunks": 1, "size": len(payload),
        "digest": wire.payload_digest([payload]), "sent_at": 1.0, "meta": {}, "cast": {},
    }  # fmt: skip
    fields.update(header_overrides)
    return wire.pack_frame(json.dumps(fields).encode(), payload)


def test_chunks_respect_the_frame_limit_and_reassemble_in_any_order() -> None:
    x = torch.randn(10_000)
    frames = encode(_env(x=x), limits=SMALL)
    assert len(frames) >= 10
    assert all(len(f) <= SMALL.max_frame_bytes for f in frames)
    decoder = Decoder(SMALL)
    order = frames[5:] + frames[:5][::-1]
    results = [decoder.feed(f) for f in order]
    assert all(r is None for r in results[:-1])
    assert results[-1] is not None and torch.equal(results[-1].tensors["x"], x)
    assert decoder.reassembler.buffered_bytes == 0 and decoder.reassembler.pending == 0


def test_redelivered_chunks_and_messages_are_returned_once() -> None:
    frames = encode(_env(x=torch.randn(5000)), limits=SMALL)
    decoder = Decoder(SMALL)
    delivered = [decoder.feed(f) for f in frames[:3] + frames[:3] + frames[3:] + frames]
    assert sum(r is not None for r in delivered) == 1
    assert decoder.duplicates == len(frames)  # every chunk after completion counted once
    assert decoder.reassembler.pending == 0


def test_reassembly_times_out_missing_chunks() -> None:
    now = [100.0]
    decoder = Decoder(SMALL, timeout_s=5.0, clock=lambda: now[0])
    frames = encode(_env(x=torch.randn(5000)), limits=SMALL)
    for frame in frames[:-1]:
        assert decoder.feed(frame) is None
    now[0] += 4.0
    assert decoder.expire() == []
    now[0] += 2.0
    errors = decoder.expire()
    assert len(errors) == 1 and isinstance(errors[0], wire.ReassemblyTimeout)
    assert f"got {len(frames) - 1} of {len(frames)} chunks" in str(errors[0])
    assert decoder.reassembler.buffered_bytes == 0


def test_reassembly_memory_is_bounded() -> None:
    decoder = Decoder(SMALL, max_buffered_bytes=40_000)  # a quarter of it per sender
    frames = encode(_env(x=torch.randn(10_000)), limits=SMALL)
    for frame in frames[:2]:
        assert decoder.feed(frame) is None
    with pytest.raises(ReassemblyOverflow, match="max_buffered_bytes=40000"):
        decoder.feed(frames[2])
    assert decoder.reassembler.buffered_bytes == 0  # the partial message was released


def test_payload_over_the_limit_is_refused_on_both_sides() -> None:
    limits = WireLimits(max_frame_bytes=4096, max_message_bytes=1000)
    with pytest.raises(PayloadTooLarge, match="max_message_bytes=1000"):
        encode(_env(x=torch.randn(1000)), limits=limits)
    frames = encode(_env(x=torch.randn(1000)), limits=SMALL)
    with pytest.raises(PayloadTooLarge):
        Decoder(limits).feed(frames[0])


def test_bad_magic_version_truncation_and_header() -> None:
    frame = encode(_env(x=torch.randn(4)))[0]
    with pytest.raises(BadMagic):
        Decoder().feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(UnsupportedVersion, match="schema version 9"):
        Decoder().feed(frame[:4] + struct.pack(">H", 9) + frame[6:])
    with pytest.raises(TruncatedFrame):
        Decoder().feed(frame[: PREFIX_BYTES + 10])
    with pytest.raises(TruncatedFrame):
        Decoder().feed(frame[:3])
    with pytest.raises(MalformedHeader):
        Decoder().feed(wire.pack_frame(b"{not json", b""))
    with pytest.raises(MalformedHeader, match="site"):
        Decoder().feed(_frame_with_payload(b"", site="a/b"))
    with pytest.raises(MalformedHeader, match="chunk index"):
        Decoder().feed(_frame_with_payload(b"", chunk=2, chunks=2))


def test_checksum_mismatch_and_corrupt_payload() -> None:
    frame = bytearray(encode(_env(x=torch.randn(64)))[0])
    frame[-1] ^= 0xFF
    with pytest.raises(ChecksumMismatch):
        Decoder().feed(bytes(frame))
    with pytest.raises(MalformedPayload):
        Decoder().feed(_frame_with_payload(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}"))


def test_received_tensors_are_checked_against_the_expected_specs() -> None:
    specs = {"x": TensorSpec(torch.float32, (None, 16)), "y": TensorSpec(torch.int64, (None,))}
    decoder = Decoder(expected_for=lambda header: specs if header.kind == "activations" else None)
    good = _env(x=torch.randn(4, 16), y=torch.arange(4))
    assert decoder.feed(encode(good)[0]) is not None

    cases = {
        "float16\\[4, 16\\], expected float32\\[\\*, 16\\]": _env(
            x=torch.randn(4, 16).half(), y=torch.arange(4)
        ),
        "float32\\[4, 8\\], expected float32\\[\\*, 16\\]": _env(
            x=torch.randn(4, 8), y=torch.arange(4)
        ),
        "missing \\['y'\\]": _env(x=torch.randn(4, 16)),
        "unexpected \\['z'\\]": _env(x=torch.randn(4, 16), y=torch.arange(4), z=torch.ones(1)),
    }
    for message, envelope in cases.items():
        with pytest.raises(TensorSpecMismatch, match=message):
            decoder.feed(encode(envelope)[0])


def test_encode_refuses_invalid_routing_fields() -> None:
    with pytest.raises(ValueError, match="invalid envelope"):
        encode(Envelope("job/1", "site-a", "x"))
    with pytest.raises(ValueError, match="invalid envelope"):
        encode(Envelope("job", "site-a", "x", round=-1))


def test_chunks_whose_headers_disagree_are_refused() -> None:
    frames = encode(_env(x=torch.randn(5000)), limits=SMALL)
    decoder = Decoder(SMALL)
    assert decoder.feed(frames[0]) is None
    header = unpack_frame(frames[1]).header
    forged = header.model_copy(update={"step": header.step + 1})
    with pytest.raises(MalformedHeader, match="disagrees"):
        decoder.feed(wire.pack_frame(forged.to_json(), unpack_frame(frames[1]).chunk))
    assert decoder.reassembler.pending == 0  # the message was dropped, nothing held
