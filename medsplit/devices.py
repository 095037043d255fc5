"""Where a party's layers run: ``device: auto | cpu | cuda | cuda:N`` in site.yaml and job.yaml."""

from __future__ import annotations

import os

import torch


def use_deterministic_algorithms() -> None:
    """torch's deterministic kernels (``training.deterministic``): on CUDA, cuBLAS needs a
    fixed workspace, set before its first handle is made (the first matrix product)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor that came over the wire, on ``device``: to a GPU through pinned memory,
    without blocking the host (the copy overlaps what the host does next)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def pick_device(choice: str) -> torch.device:
    """The device ``choice`` names; a CUDA device that is not there is one clear error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(f"device: {choice} was requested but no CUDA device is available")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise RuntimeError(
            f"device: {choice} was requested but this machine has {count} CUDA device(s) "
            f"(cuda:0..cuda:{count - 1})"
        )
    return device
