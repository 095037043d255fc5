"""Durable snapshots of training state: tensors as safetensors, everything else as JSON.

Both processes persist what they need to go on after a crash -- the aggregator its job
(``aggregator.checkpoint``), a site the state of its layers before the round it is training
(``edge_agent.agent``). Both go through ``dump``/``load`` here, so both get the same guarantees:

* never pickle: tensors are safetensors, the rest one JSON document in the file's metadata;
* one file, written with ``storage.atomic_write`` (temp file, fsync, rename, fsync dir), so a
  crash leaves the old file or the new one;
* a SHA-256 over the JSON and every tensor's bytes, so a file damaged later (a bad disk, a
  truncated copy) is refused with ``SnapshotError`` instead of resuming from garbage.

Optimizers are flattened by ``optimizer_tensors`` / ``load_optimizer``: each state tensor
becomes ``{prefix}/{param index}/{name}``; scalars and the parameter groups go in the JSON.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save, save_file

from medsplit.storage import atomic_file

FORMAT = "medsplit-snapshot/1"


class SnapshotError(ValueError):
    """A snapshot file that cannot be used: torn, corrupt, or of another format."""


def _digest(document: str, tensors: Mapping[str, torch.Tensor]) -> str:
    sha = hashlib.sha256(document.encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        sha.update(name.encode())
        sha.update(str(tensor.dtype).encode())
        sha.update(str(tuple(tensor.shape)).encode())
        if tensor.numel():  # hashed in place: no copy of a large tensor
            data: Any = tensor.reshape(-1).view(torch.uint8).numpy()  # numpy: a buffer
            sha.update(data)
    return sha.hexdigest()


def _prepared(
    tensors: Mapping[str, torch.Tensor], document: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps(document, separators=(",", ":"), sort_keys=True)
    return flat, {"format": FORMAT, "document": text, "sha256": _digest(text, flat)}


def encode(tensors: Mapping[str, torch.Tensor], document: Mapping[str, Any]) -> bytes:
    flat, metadata = _prepared(tensors, document)
    return save(flat, metadata=metadata)


def decode(data: bytes, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and JSON document of a snapshot; ``SnapshotError`` naming ``source``."""
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{source}: not a readable safetensors file ({exc})") from None
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise SnapshotError(f"{source}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    text = metadata.get("document", "")
    if _digest(text, tensors) != metadata.get("sha256"):
        raise SnapshotError(f"{source}: checksum mismatch (the file was damaged after writing)")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SnapshotError(f"{source}: its document is not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise SnapshotError(f"{source}: its document is not a JSON object")
    return tensors, document


def dump(path: Path, tensors: Mapping[str, torch.Tensor], document: Mapping[str, Any]) -> None:
    """Write a snapshot durably; tensors stream to the file (no whole copy in memory)."""
    flat, metadata = _prepared(tensors, document)
    with atomic_file(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode(data, str(path))


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, prefix: str, *, copy: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state as named tensors plus a JSON-able remainder; ``copy=False`` for a
    state written out at once (the tensors are the optimizer's own)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                own = value.detach().cpu()
                tensors[f"{prefix}/{index}/{name}"] = own.clone() if copy else own
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    document: Mapping[str, Any],
    prefix: str,
) -> None:
    """Restore what ``optimizer_tensors`` saved (``SnapshotError`` if it does not fit)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        head, _, rest = key.partition("/")
        if head != prefix or "/" not in rest:
            continue
        index, _, name = rest.partition("/")
        state.setdefault(int(index), {})[name] = value
    for index, entries in (document.get("scalars") or {}).items():
        state.setdefault(int(index), {}).update(entries)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": document["param_groups"]})
    except (KeyError, ValueError, RuntimeError) as exc:
        raise SnapshotError(f"optimizer state {prefix!r} does not fit: {exc}") from None


def rng_states() -> dict[str, torch.Tensor]:
    """Torch's global generators (dropout draws from them), to resume the same random streams:
    the CPU's as ``rng/torch``, each CUDA device's as ``rng/cuda:N``."""
    states = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"rng/cuda:{index}"] = state
    return states


def set_rng_states(tensors: Mapping[str, torch.Tensor]) -> None:
    """Put back what ``rng_states`` kept (a snapshot from a CPU-only run leaves CUDA's alone)."""
    state = tensors.get("rng/torch")
    if state is not None:
        torch.set_rng_state(state.to(torch.uint8))
    if not torch.cuda.is_available():
        return
    for index in range(torch.cuda.device_count()):
        cuda = tensors.get(f"rng/cuda:{index}")
        if cuda is not None:
            torch.cuda.set_rng_state(cuda.to(torch.uint8), index)
