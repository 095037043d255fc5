"""The lean codec: safetensors' exact bytes without its copies, 8-bit tensors, the digest."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from medsplit import allocator, wire
from medsplit.wire import (
    Decoder,
    Envelope,
    MalformedPayload,
    WireLimits,
    encode,
    layout,
    unpack_frame,
)
from medsplit.wire.quantize import dequantize, quantize

DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.float8_e4m3fn, torch.float8_e5m2,
]  # fmt: skip


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    source = torch.randn(4, 3, 5, generator=generator) * 3
    out = {str(d).removeprefix("torch."): source.to(d) for d in DTYPES if d != torch.bool}
    return out | {"bool": source > 0, "empty": torch.zeros(0, 7), "scalar": torch.tensor(2.5)}


def _chunks(payload: bytes, size: int) -> list[memoryview]:
    view = memoryview(payload)
    return [view[i : i + size] for i in range(0, len(payload), size)]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, got in a.items():
        want = b[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def test_the_payload_is_safetensors_both_ways() -> None:
    tensors = _tensors()
    ours = layout.join(layout.segments(tensors))
    _same(st_load(ours), tensors)  # the library reads what we write
    theirs = st_save(tensors, metadata={"written": "by safetensors"})
    for size in (len(theirs), 1, 7, 4096):  # and we read what it writes, split anywhere
        _same(layout.read(_chunks(theirs, size)), tensors)


def test_tensors_are_laid_out_aligned_to_their_element_size() -> None:
    tensors = {"a": torch.ones(3, dtype=torch.int8), "b": torch.ones(5, dtype=torch.float64)}
    payload = layout.join(layout.segments(tensors))
    (table_len,) = struct.unpack("<Q", payload[:8])
    assert table_len % 8 == 0
    table = json.loads(payload[8 : 8 + table_len])
    assert table["b"]["data_offsets"] == [0, 40] and table["a"]["data_offsets"] == [40, 43]


def _payload(table: dict[str, object], data: bytes) -> bytes:
    text = json.dumps(table).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    ("table", "data", "why"),
    [
        ({"x": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "expected 8"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "starts at 4"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9, "holds 9"),
        ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 40]}}, b"\0" * 4, "range"),
        ({"x": {"dtype": "F32", "shape": [1]}}, b"", "data_offsets"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
        (
            {
                "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]},
            },
            b"\0" * 6,
            "starts at 2",
        ),
    ],
)
def test_a_malformed_table_is_refused_naming_the_tensor(
    table: dict[str, object], data: bytes, why: str
) -> None:
    with pytest.raises(MalformedPayload, match=why):
        layout.read([memoryview(_payload(table, data))])


def test_a_table_longer_than_the_payload_is_refused() -> None:
    with pytest.raises(MalformedPayload, match="does not fit"):
        layout.read([memoryview(struct.pack("<Q", 1 << 40) + b"{}")])


def _reference(x: torch.Tensor, qmax: float, dtype: torch.dtype) -> torch.Tensor:
    """Per-row symmetric quantisation written out element by element, as a reference."""
    rows = x.shape[0] if x.dim() >= 2 else 1
    flat = x.reshape(rows, -1).double()
    out = torch.empty_like(flat)
    for r in range(rows):
        amax = max(abs(v) for v in flat[r].tolist()) if flat.shape[1] else 0.0
        scale = torch.tensor(amax / qmax if amax > 0 else 1.0, dtype=torch.float32)
        for c in range(flat.shape[1]):
            scaled = torch.tensor(flat[r, c].item(), dtype=torch.float32) / scale
            if dtype == torch.int8:
                q = scaled.round().clamp(-qmax, qmax)
            else:
                q = scaled.clamp(-qmax, qmax).to(dtype).float()
            out[r, c] = (q * scale).item()
    return out.reshape(x.shape).float()


@pytest.mark.parametrize(("wire_dtype", "qmax"), [("int8", 127.0), ("float8_e4m3fn", 448.0)])
def test_eight_bit_tensors_arrive_as_the_reference_quantisation(
    wire_dtype: str, qmax: float
) -> None:
    generator = torch.Generator().manual_seed(1)
    x = (
        torch.randn(6, 4, 3, generator=generator)
        * torch.tensor([0.01, 1, 5, 100, 0, 3])[:, None, None]
    )
    small = torch.randn(9, generator=generator)
    sent = Envelope("j", "s", "activations", tensors={"h": x, "v": small, "w": small.clone()})
    limits = WireLimits(max_frame_bytes=4096)
    decoder = Decoder(limits)
    frames = encode(sent, wire_dtype=wire_dtype, cast={"h", "v"}, limits=limits)  # type: ignore[arg-type]
    got = [decoder.feed(f) for f in frames][-1]
    assert got is not None
    target = torch.int8 if wire_dtype == "int8" else torch.float8_e4m3fn
    assert torch.equal(got.tensors["h"], _reference(x, qmax, target))
    assert torch.equal(got.tensors["v"], _reference(small, qmax, target))
    assert torch.equal(got.tensors["w"], small)  # not named in cast: exact float32
    assert got.tensors["h"][4].abs().sum() == 0  # a zero row stays zero
    assert set(got.tensors) == {"h", "v", "w"}  # the scales are consumed


def test_eight_bits_carry_a_quarter_of_the_bytes() -> None:
    x = torch.randn(32, 64, 8, 8)
    sizes = {
        dtype: len(wire.encode_tensors({"h": x}, dtype)[0])  # type: ignore[arg-type]
        for dtype in ("float32", "float16", "int8", "float8_e4m3fn")
    }
    assert sizes["int8"] < 0.26 * sizes["float32"] and sizes["float8_e4m3fn"] == sizes["int8"]
    assert sizes["float16"] < 0.51 * sizes["float32"]


def _quantised_frame(mutate: object) -> bytes:
    values, scale = quantize(torch.randn(3, 4), "int8")
    tensors = {"h": values, "h@scale": scale}
    mutate(tensors)  # type: ignore[operator]
    payload = layout.join(layout.segments(tensors))
    header = {
        "job": "j", "site": "s", "kind": "activations", "round": 0, "step": 0,
        "msg_id": "ab" * 16, "chunk": 0, "chunks": 1, "size": len(payload),
        "digest": wire.payload_digest([payload]), "sent_at": 1.0, "meta": {},
        "cast": {"h": "float32"},
    }  # fmt: skip
    return wire.pack_frame(json.dumps(header).encode(), payload)


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda t: t.pop("h@scale"), "needs a float32 scale of shape"),
        (lambda t: t.update({"h@scale": torch.ones(2)}), "needs a float32 scale of shape"),
        (lambda t: t.update({"h@scale": -torch.ones(3)}), "finite and positive"),
        (lambda t: t.update({"h@scale": torch.full((3,), float("inf"))}), "finite and positive"),
        (lambda t: t.update({"h": torch.ones(3, 4, dtype=torch.int16)}), "travels as torch.int16"),
        (lambda t: t.update({"g@scale": torch.ones(1)}), "scales without a quantised tensor"),
    ],
)
def test_a_bad_scale_is_refused(mutate: object, why: str) -> None:
    with pytest.raises(MalformedPayload, match=why):
        Decoder().feed(_quantised_frame(mutate))


def test_dequantize_inverts_quantize_within_half_a_step() -> None:
    x = torch.randn(16, 100)
    values, scale = quantize(x, "int8")
    back = dequantize(values, scale, torch.float32)
    assert ((back - x).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("wire_dtype", ["int8", "float8_e4m3fn", "float16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_value_is_refused_before_it_is_quantised(wire_dtype: str, bad: float) -> None:
    x = torch.randn(4, 5)
    x[2, 3] = bad
    with pytest.raises(wire.NonFiniteTensor, match="'h'"):
        encode(Envelope("j", "s", "k", tensors={"h": x}), wire_dtype=wire_dtype)  # type: ignore[arg-type]


def test_a_scale_name_is_reserved() -> None:
    with pytest.raises(ValueError, match="reserved"):
        encode(Envelope("j", "s", "k", tensors={"h@scale": torch.ones(1)}))


def test_every_chunk_header_is_numbered_even_with_a_meta_key_named_chunk() -> None:
    sent = Envelope("j", "s", "k", tensors={"x": torch.randn(3000)}, meta={"chunk": 0})
    frames = encode(sent, limits=WireLimits(max_frame_bytes=4096))
    headers = [unpack_frame(f).header for f in frames]
    assert [h.chunk for h in headers] == list(range(len(frames)))
    assert all(h.meta == {"chunk": 0} and h.chunks == len(frames) for h in headers)


def test_the_digest_covers_every_byte() -> None:
    frame = bytearray(encode(Envelope("j", "s", "k", tensors={"x": torch.ones(100)}))[0])
    frame[-1] ^= 1  # a value that is still finite, in a valid layout
    with pytest.raises(wire.ChecksumMismatch, match="digest"):
        Decoder().feed(bytes(frame))


def test_the_allocator_is_tuned_here_and_can_be_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert allocator.tune()  # glibc on Linux, as in the images
    monkeypatch.setenv("MEDSPLIT_MALLOC_TUNING", "off")
    assert not allocator._apply()


def test_freed_memory_is_given_back_at_most_once_a_second_unless_asked_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert allocator.release(now=True)  # glibc: malloc_trim ran
    assert not allocator.release()  # within the interval: ask again later
    assert allocator.release(now=True)  # nothing is left half-built: give it back at once
    monkeypatch.setenv("MEDSPLIT_MALLOC_RELEASE", "off")
    assert allocator.release()  # nothing to do: never "ask again"
