"""Export a model to ONNX, and refuse to write one that does not compute what torch computes.

The graph comes from PyTorch's ``torch.export``-based exporter with a dynamic batch axis and a
pinned opset, so a hospital's runtime sees the same operators whatever torch built it. The
caller's metadata goes into the model's ``metadata_props``. Before anything is written, the
model passes ``onnx.checker`` and a parity check: onnxruntime and torch eager run the same sample
batch (and its first row alone, which also proves the batch axis is dynamic) and must agree
within ``tolerance``; the error says by how much a model failed. No file I/O here: the caller
gets the checked bytes and decides where they go.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

if TYPE_CHECKING:
    import onnx

# onnx and onnxruntime load when a model is exported, not when this module is imported: an agent
# imports it to finish a job, and must not pay for them while it trains (issue 32).

OPSET = 18  # supported by every onnxruntime since 1.14
INPUT_NAME, OUTPUT_NAME = "input", "logits"
MAX_BATCH = 1 << 16
_EXPORT_LOCK = threading.RLock()


@contextmanager
def export_section() -> Iterator[None]:
    """Hold while preparing what is exported and exporting it. torch.export's tracing changes
    process-wide state, so torch code run by another thread of the process during an export
    can fail (seen: a shape check of another agent's finish, ``KeyError: 'custom'`` from
    torch.fx's annotations). Agents of one process -- experiments, tests -- therefore finish
    one at a time; an agent in its own process is not slowed."""
    with _EXPORT_LOCK:
        yield


class ExportError(RuntimeError):
    """The model could not be exported, or the exported graph is not valid ONNX."""


class ParityError(ExportError):
    """onnxruntime's outputs differ from torch's by more than the tolerance."""

    def __init__(self, max_abs_diff: float, tolerance: float) -> None:
        super().__init__(
            f"ONNX parity check failed: onnxruntime and torch differ by up to {max_abs_diff:.3g} "
            f"(tolerance {tolerance:g}); the model was not written"
        )
        self.max_abs_diff = max_abs_diff


@dataclass(frozen=True)
class ExportResult:
    data: bytes  # the serialized ONNX model
    opset: int
    max_abs_diff: float
    path: Path | None = None  # where the caller wrote it

    @property
    def bytes(self) -> int:
        return len(self.data)


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """A fingerprint of the weights: sha256 of their safetensors serialisation (sorted names)."""
    ordered = {k: state[k].detach().cpu().contiguous() for k in sorted(state)}
    return hashlib.sha256(save_safetensors(ordered)).hexdigest()


def export_onnx(
    model: nn.Module,
    sample: torch.Tensor,
    *,
    metadata: Mapping[str, str] | None = None,
    opset: int = OPSET,
    tolerance: float = 1e-4,
) -> ExportResult:
    """``model`` as checked ONNX bytes, once it passes the checks above.

    ``sample`` is a batch of real or representative inputs, shape ``(batch, *input_shape)``.
    """
    if sample.dim() < 2 or len(sample) < 1:
        raise ExportError(f"sample must be a batch (batch, *input_shape), got {list(sample.shape)}")
    model = model.eval().cpu()
    sample = sample.detach().float().cpu()
    proto = _to_onnx(model, sample, opset)
    for key, value in sorted((metadata or {}).items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    import onnx  # noqa: PLC0415 - see the module's imports

    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph is not valid ONNX: {exc}") from None
    data = proto.SerializeToString()
    diff = parity(model, data, sample)
    if not diff <= tolerance:  # NaN fails too
        raise ParityError(diff, tolerance)
    return ExportResult(data, opset, diff)


def parity(model: nn.Module, onnx_model: bytes, sample: torch.Tensor) -> float:
    """Largest absolute difference between torch and onnxruntime, over the batch and its first row."""
    import onnxruntime  # noqa: PLC0415 - see the module's imports

    session = onnxruntime.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for batch in (sample, sample[:1]):
            expected = model(batch).numpy()
            (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
            if actual.shape != expected.shape:
                return float("inf")
            worst = max(worst, float(np.max(np.abs(actual - expected))))
    return worst


def _to_onnx(model: nn.Module, sample: torch.Tensor, opset: int) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # torch.export keeps global tracing state: one export at a time per process (agents of an
    # experiment run as threads). The exporter also warns about optional torchvision operators.
    with _EXPORT_LOCK, warnings.catch_warnings(), _quiet_torch_onnx():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model,
                (sample,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many kinds; all mean "cannot export"
            raise ExportError(f"torch could not export the model: {_summary(exc)}") from exc
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto: onnx.ModelProto = program.model_proto
    proto.producer_name = "medsplit"
    return proto


def _summary(exc: Exception) -> str:
    """The exporter's message without colour codes: its first line and its cause."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()]
    lines = [line for line in lines if line]
    if "## Exception summary" in lines:
        cause = lines[lines.index("## Exception summary") + 1 :][:1]
        return " ".join(lines[:1] + cause)
    return " ".join(lines[:2])


class _quiet_torch_onnx:  # noqa: N801 (used like a function)
    """Silence torch.onnx's own loggers for the duration of an export."""

    def __enter__(self) -> None:
        self._loggers = [
            logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")
        ]
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self._loggers, self._levels, strict=True):
            lg.setLevel(level)
