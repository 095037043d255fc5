"""The built-in ``synthetic-cxr`` dataset, read the way a hospital's images are: from DICOM.

The first load writes the images as DICOM files (``edge_agent.data.dicom_synth``, one neutral
scanner: 16 bits, ``MONOCHROME2``, no noise or tone of its own) into a cache folder, then every
load reads them through the same ``dicom`` source an agent uses for a hospital's folder, with
its decoded-image cache. Partitions (``feature-shift`` included) then apply as for any dataset.
The folder is ``$MEDSPLIT_CACHE`` or ``~/.cache/medsplit``; it is written to a temporary name and
renamed, so agents starting together never read a half-written set.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from edge_agent.data.dicom_source import load_dicom_folder
from edge_agent.data.dicom_synth import LABELS, Encoding, write_folder
from edge_agent.data.settings import DicomData, Preprocessing

__all__ = ["BUILTIN_PREPROCESSING", "LABELS", "cache_root", "synthetic_cxr_from_dicom"]
from edge_agent.data.synthetic import synthetic_cxr

NEUTRAL = Encoding(16, 0.05, 0.0, "MONOCHROME2", pixel_spacing=0.15, noise=0.0)
BUILTIN_PREPROCESSING = Preprocessing(size=64)  # the files' own window; standardised later


def cache_root() -> Path:
    return Path(os.environ.get("MEDSPLIT_CACHE") or Path.home() / ".cache" / "medsplit")


def synthetic_cxr_from_dicom(
    count: int, *, size: int = 64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``synthetic_cxr(count, size, seed)`` written as DICOM once, read back as a hospital would.

    The images are generated only when the folder is written, not on every load.
    """
    folder = cache_root() / f"synthetic-cxr-{count}x{size}-seed{seed}-v1"
    if not (folder / "labels.csv").is_file():
        _write_atomically(folder, *synthetic_cxr(count, size=size, seed=seed), seed)
    config = DicomData(
        folder=folder,
        classes=list(LABELS),
        preprocessing=BUILTIN_PREPROCESSING.model_copy(update={"size": size}),
        cache_dir=folder.with_name(folder.name + "-decoded"),
    )
    x, y, _, _ = load_dicom_folder(config)
    return x, y


def _write_atomically(folder: Path, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    rng = np.random.default_rng([seed, 0xC0DE])
    write_folder(staging, images[:, 0].numpy(), labels.numpy(), NEUTRAL, rng, prefix="B")
    try:
        staging.rename(folder)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(staging, ignore_errors=True)
