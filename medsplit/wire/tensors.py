"""Tensors to bytes and back: safetensors' layout, 16- or 8-bit on the wire, and checks.

safetensors is a flat, declarative format (a JSON table of names, dtypes, shapes and offsets,
then raw bytes): decoding it cannot execute code, unlike pickle. ``medsplit.wire.layout``
writes and reads that layout without the library's copies. On top of it this module adds
what a sender of activations wants (down-casting to float16/bfloat16, or 8-bit values with a
scale per row, ``medsplit.wire.quantize``) and what a receiver of untrusted tensors needs:
finite-value checks and a comparison against the dtypes and shapes the job plan says must
arrive.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from medsplit.modes import WireDtype
from medsplit.wire import layout
from medsplit.wire.errors import MalformedPayload, NonFiniteTensor, TensorSpecMismatch
from medsplit.wire.quantize import (
    QUANTIZED,
    SCALE_SUFFIX,
    WIRE_OF,
    dequantize,
    quantize,
    scale_name,
    scale_rows,
)

_DOWNCAST: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_CASTABLE = {torch.float32: "float32", torch.float64: "float64"}
_LOGICAL: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver expects of one tensor. ``None`` in ``shape`` accepts any size there."""

    dtype: torch.dtype
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        dims = ", ".join("*" if d is None else str(d) for d in self.shape)
        return f"{str(self.dtype).removeprefix('torch.')}[{dims}]"

    def matches_shape(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(
            want is None or want == got for want, got in zip(self.shape, shape, strict=True)
        )


_ISFINITE_NATIVE = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
_BY_NUMPY = {torch.float32, torch.float64}


def _extremes(tensor: torch.Tensor) -> tuple[float, float]:
    """The smallest and largest value: NaN if any is NaN, and any Inf shows.

    float32/float64 on the CPU go through numpy: single-threaded SIMD, 0.06 ms/MB. torch's
    ``aminmax`` is as fast on an idle machine but runs on the OpenMP pool, and on a busy one
    (paho's threads and the broker on the same cores) waking the pool's sleeping worker cost
    ~0.8 ms per 2 MB check in a py-spy profile. The others (16-bit, float8 widened) use torch:
    numpy's float16 min is 100x slower."""
    if tensor.dtype in _BY_NUMPY and tensor.device.type == "cpu" and tensor.is_contiguous():
        values = tensor.detach().numpy()
        return float(values.min()), float(values.max())
    # isfinite/aminmax have no kernels for the float8 types: check them widened.
    wide = tensor if tensor.dtype in _ISFINITE_NATIVE else tensor.float()
    low, high = torch.aminmax(wide)
    return low.item(), high.item()


def _check_finite(name: str, tensor: torch.Tensor, context: str) -> None:
    if not tensor.is_floating_point() or not tensor.numel():
        return
    # Min and max propagate NaN and expose Inf, in one pass ~20x faster than
    # isfinite().all(), which matters for megabytes of activations per step.
    low, high = _extremes(tensor)
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int((~torch.isfinite(tensor.float())).sum())
        raise NonFiniteTensor(f"tensor {name!r} has {bad} NaN/Inf value(s){context}")


def _for_the_wire(name: str, tensor: torch.Tensor, wire_dtype: WireDtype) -> list[torch.Tensor]:
    """A float tensor as it travels in ``wire_dtype``: the values, then their scales if 8-bit.
    A NaN or Inf anywhere in a row makes its scale NaN or Inf: checked there, in one pass."""
    if wire_dtype in QUANTIZED:
        values, scale = quantize(tensor, wire_dtype)
        _check_finite(name, scale, "")
        return [values, scale]
    out = tensor.to(_DOWNCAST[wire_dtype])
    _check_finite(name, out, f" after down-casting to {wire_dtype} (value out of range)")
    return [out]


def prepare_tensors(
    tensors: Mapping[str, torch.Tensor],
    wire_dtype: WireDtype = "float32",
    cast: Collection[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check tensors and put them in the form they travel in: contiguous, on the CPU.

    With a ``wire_dtype`` other than float32, the float32/float64 tensors named in ``cast``
    (all of them when ``cast`` is None) travel down-cast (float16, bfloat16) or quantised
    (int8, float8_e4m3fn, with ``<name>@scale``); the returned map records their original
    dtype so the receiver restores it. Refuses NaN/Inf, including overflow created by a
    down-cast; a name ending in ``@scale`` is reserved and refused (a programming error).
    """
    prepared: dict[str, torch.Tensor] = {}
    restored: dict[str, str] = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if name.endswith(SCALE_SUFFIX):
            raise ValueError(f"tensor name {name!r}: names ending in {SCALE_SUFFIX!r} are reserved")
        out = tensor.detach()
        if wire_dtype != "float32" and out.dtype in _CASTABLE and (cast is None or name in cast):
            if wire_dtype not in QUANTIZED:
                _check_finite(name, out, "")
            restored[name] = _CASTABLE[out.dtype]
            out, *scale = _for_the_wire(name, out, wire_dtype)
            if scale:
                prepared[scale_name(name)] = scale[0]
        else:
            _check_finite(name, out, "")
        prepared[name] = out.cpu().contiguous()
    return prepared, restored


def encode_tensors(
    tensors: Mapping[str, torch.Tensor],
    wire_dtype: WireDtype = "float32",
    cast: Collection[str] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The safetensors bytes of ``tensors`` as ``prepare_tensors`` leaves them, in one buffer."""
    prepared, restored = prepare_tensors(tensors, wire_dtype, cast)
    return layout.join(layout.segments(prepared)), restored


def _restore(name: str, tensors: dict[str, torch.Tensor], logical: torch.dtype) -> torch.Tensor:
    """A down-cast or quantised tensor back in its original dtype; consumes its scale."""
    tensor = tensors[name]
    scale = tensors.pop(scale_name(name), None)
    if tensor.dtype in _DOWNCAST.values():
        if scale is not None:
            raise MalformedPayload(f"tensor {name!r} travels as {tensor.dtype} but has a scale")
        return tensor.to(logical)
    if tensor.dtype not in WIRE_OF:
        raise MalformedPayload(
            f"tensor {name!r} is marked as down-cast but travels as {tensor.dtype}"
        )
    rows = scale_rows(tensor.shape)
    if scale is None or scale.dtype != torch.float32 or tuple(scale.shape) != (rows,):
        got = "none" if scale is None else f"{scale.dtype} {tuple(scale.shape)}"
        raise MalformedPayload(
            f"tensor {name!r} travels as {tensor.dtype} and needs a float32 scale of shape "
            f"({rows},), got {got}"
        )
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        raise MalformedPayload(f"tensor {name!r}: its scales must be finite and positive")
    return dequantize(tensor, scale, logical)


def decode_tensors(
    payload: bytes | Sequence[memoryview], cast: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Tensors from a payload (whole, or its chunks in order), back in their original dtypes.

    Raises ``WireError`` subclasses only."""
    chunks = [memoryview(payload)] if isinstance(payload, bytes | bytearray) else payload
    tensors = layout.read(chunks)
    for name, logical in cast.items():
        if name not in tensors:
            raise MalformedPayload(f"header says tensor {name!r} was down-cast, but it is absent")
        tensors[name] = _restore(name, tensors, _LOGICAL[logical])
    stray = sorted(name for name in tensors if name.endswith(SCALE_SUFFIX))
    if stray:
        raise MalformedPayload(f"scales without a quantised tensor: {stray}")
    return tensors


def check_tensors(
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, TensorSpec] | None,
) -> None:
    """Refuse non-finite values, and tensors that differ from ``expected`` (when given).

    The receiver calls this before any tensor touches a model: a wrong shape would otherwise
    surface as an obscure error inside training, and a NaN would silently poison the weights.
    """
    if expected is not None:
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise TensorSpecMismatch(
                f"tensor names differ from what was expected: missing {missing}, unexpected {extra}"
            )
        for name, spec in expected.items():
            got = tensors[name]
            if got.dtype != spec.dtype or not spec.matches_shape(tuple(got.shape)):
                actual = TensorSpec(got.dtype, tuple(got.shape)).describe()
                raise TensorSpecMismatch(f"tensor {name!r} is {actual}, expected {spec.describe()}")
    for name, tensor in tensors.items():
        _check_finite(name, tensor, "")
