"""Decoded images kept on the site's own disk, so that a restart does not decode every file again.

An entry is keyed by the file's (or a series' files') absolute path, size and modification time, by the
preprocessing and by the decoder's version, so a changed file, a changed window or a change in
how medsplit decodes is decoded afresh. Entries are safetensors
files (never pickle); the two header values loading needs (SOPInstanceUID, PatientID) ride in
the entry's metadata. The cache lives next to the site's state and never leaves the site.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from medsplit.storage import atomic_write

Header = dict[str, str]
# Bump when ``edge_agent.data.dicom`` decodes the same file and preprocessing differently.
DECODER = "2"  # 2: no window means the stored range, not each image's own min/max


class ImageCache:
    """Entries for one preprocessing and decoder; a key is a file or (a series) many files."""

    def __init__(self, folder: Path, preprocessing: BaseModel, decoder: str = DECODER) -> None:
        self.folder = folder
        self.preprocessing = preprocessing.model_dump_json()
        self.decoder = decoder
        self.hits = self.misses = 0

    def key(self, path: Path | Sequence[Path]) -> str:
        """What names an entry: the files' paths, sizes and times, the preprocessing, the decoder."""
        files = [path] if isinstance(path, Path) else sorted(path)
        stats = [(f.resolve(), f.stat()) for f in files]
        names = "|".join(f"{p}|{s.st_size}|{s.st_mtime_ns}" for p, s in stats)
        text = f"{names}|{self.preprocessing}|{self.decoder}"
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    def _entry(self, path: Path | Sequence[Path]) -> Path:
        return self.folder / f"{self.key(path)}.safetensors"

    def get(self, path: Path | Sequence[Path]) -> tuple[torch.Tensor, Header] | None:
        entry = self._entry(path)
        try:
            with safe_open(str(entry), framework="pt") as handle:
                image, header = handle.get_tensor("image"), dict(handle.metadata() or {})
        except (OSError, SafetensorError):
            self.misses += 1
            return None
        self.hits += 1
        return image, header

    def put(self, path: Path | Sequence[Path], image: torch.Tensor, header: Header) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self._entry(path), save({"image": image.contiguous()}, metadata=header))
