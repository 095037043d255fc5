"""Mixed precision on either side of a cut: ``training.precision`` (fp32 | bf16 | fp16).

Each party runs its own layers under ``torch.autocast`` in the job's precision; what crosses
the cut is always float32 (or the job's ``wire_dtype``), so a bf16 head and an fp32 trunk
agree on the protocol. With fp16 each party also keeps its own ``torch.amp.GradScaler``: it
scales the loss (or, for the trunk, its output) before backward and steps only when no
gradient overflowed. Gradients leave a party *unscaled*, so the other side never needs to
know this side's scale. bf16 has float32's range and needs no scaler.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager

import torch

DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class MixedPrecision:
    """Autocast and (fp16) loss scaling for one party's layers on ``device``."""

    def __init__(self, precision: str, device: torch.device) -> None:
        if precision not in DTYPES:
            raise ValueError(f"precision {precision!r}; allowed: {', '.join(DTYPES)}")
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=precision == "fp16")

    def autocast(self) -> AbstractContextManager[object]:
        """The forward passes of this party's layers."""
        return torch.autocast(
            self.device_type,
            dtype=self.dtype or torch.float32,
            enabled=self.dtype is not None,
        )

    @property
    def scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def backward(self, tensor: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """``tensor.backward(grad)``, scaled for fp16."""
        scaled = self.scaler.scale(tensor) if self.scaler.is_enabled() else tensor
        scaled.backward(grad)

    def unscaled(self, grad: torch.Tensor) -> torch.Tensor:
        """A gradient as it may leave this party: in float32, without this party's scale."""
        grad = grad.float()
        return grad / self.scale if self.scaler.is_enabled() else grad

    def state(self, prefix: str = "amp") -> dict[str, torch.Tensor]:
        """The fp16 scaler's state as tensors, for snapshots and checkpoints (nothing for
        fp32 and bf16): a resumed job goes on with the scale it had, not a fresh one."""
        if not self.scaler.is_enabled():
            return {}
        state = self.scaler.state_dict()
        return {
            f"{prefix}/scale": torch.tensor(float(state["scale"]), dtype=torch.float64),
            f"{prefix}/growth_tracker": torch.tensor(int(state["_growth_tracker"])),
        }

    def load(self, tensors: Mapping[str, torch.Tensor], prefix: str = "amp") -> None:
        """Put back what ``state`` kept; a snapshot without it leaves the scaler as it is."""
        scale = tensors.get(f"{prefix}/scale")
        if not self.scaler.is_enabled() or scale is None:
            return
        state = self.scaler.state_dict()
        state["scale"] = float(scale)
        state["_growth_tracker"] = int(tensors[f"{prefix}/growth_tracker"])
        self.scaler.load_state_dict(state)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's step; with fp16, skipped when a gradient overflowed."""
        if not self.scaler.is_enabled():
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
