"""One DICOM file to one training image, the way a radiology viewer would show it.

The pipeline, in DICOM's own order (PS3.3 C.11 and C.7.6.3):

1. stored values, as many bits as ``BitsStored`` says (pydicom unpacks and masks them);
2. the Modality LUT: ``RescaleSlope``/``RescaleIntercept`` (or a Modality LUT Sequence) turn
   stored values into physical ones, e.g. Hounsfield units;
3. the VOI LUT: the configured window, else the file's VOI LUT Sequence or
   ``WindowCenter``/``WindowWidth``, else (and with ``window: auto``) the preprocessing's
   ``range``, which a site's loader fixes from all its images (``site_range``). Never each
   image's own minimum and maximum, which would erase absolute intensity (a lesion's
   brightness) and make every image look alike; only a lone file decoded with no range at all
   falls back to its own extent;
4. ``MONOCHROME1`` is inverted so that bright always means dense;
5. the chosen frame of a multi-frame file, resized to the model's input and scaled to [0, 1].

Everything that can go wrong raises ``DicomError`` naming the file and what was expected:
not DICOM, truncated, no pixel data, colour, a compressed transfer syntax without a decoder
(with the package to install), a frame out of range, and an image that decodes to a constant
(its window excludes every pixel value: a broken stored window, which ``window: auto`` ignores).
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from edge_agent.data.settings import Preprocessing

# An image whose decoded values vary less than this (on the 0..1 scale) carries no picture.
MIN_CONTRAST = 1e-3

# Which pip packages decode which compressed transfer syntaxes (pydicom's pixel data handlers).
_DECODERS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE Lossless
}


class DicomError(ValueError):
    """A DICOM file that cannot become a training image; the message says which and why."""


def read_image(path: str | Path, preprocessing: Preprocessing | None = None) -> torch.Tensor:
    """The file's image as float32 [1, size, size]; ``DicomError`` if impossible.

    Values are in [0, 1], then shifted and scaled by the preprocessing's ``mean`` and ``std``.
    """
    return to_image(read_dataset(path), preprocessing or Preprocessing(), source=str(path))


def read_dataset(path: str | Path | BinaryIO, source: str | None = None) -> Dataset:
    """Parse a DICOM file (header and pixel data), refusing non-DICOM and unreadable files.

    ``path`` may be an open binary file (an upload); ``source`` names it in errors.
    """
    if source is None:
        source = str(path)
    try:
        return pydicom.dcmread(str(path) if isinstance(path, str | Path) else path)
    except InvalidDicomError as exc:
        raise DicomError(f"{source}: not a DICOM file ({exc})") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DicomError(f"{source}: unreadable DICOM ({type(exc).__name__}: {exc})") from None


def to_image(
    ds: Dataset, preprocessing: Preprocessing, *, source: str = "<dataset>"
) -> torch.Tensor:
    stored = stored_pixels(ds, preprocessing.frame, source)
    physical = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    low, high, windowed = _window(physical, ds, preprocessing)
    scaled = (np.clip(windowed, low, high) - low) / max(high - low, 1e-12)
    if float(scaled.std()) < MIN_CONTRAST:
        raise DicomError(
            f"{source}: decodes to a constant image (every pixel {float(scaled.mean()):.3g} "
            f"after the window {low:g}..{high:g}); if its stored window is wrong, set "
            "preprocessing.window to auto or to a (center, width)"
        )
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 1.0 - scaled  # MONOCHROME1: the minimum is white
    image = torch.from_numpy(scaled.astype(np.float32))[None, None]
    if image.shape[-2:] != (preprocessing.size, preprocessing.size):
        image = torch.nn.functional.interpolate(
            image, size=(preprocessing.size, preprocessing.size), mode="area"
        )
    return preprocessing.standardise(image[0].clamp(0, 1))


def stored_pixels(ds: Dataset, frame: int, source: str) -> np.ndarray:
    if "PixelData" not in ds:
        raise DicomError(f"{source}: no pixel data (is it a structured report or a dose file?)")
    photometric = ds.get("PhotometricInterpretation", "")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(
            f"{source}: photometric interpretation {photometric!r}; expected MONOCHROME1 or MONOCHROME2"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frame >= frames:
        raise DicomError(f"{source}: frame {frame} requested, the file has {frames}")
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        raise DicomError(_decoder_message(ds, source, exc)) from None
    except (ValueError, AttributeError, EOFError) as exc:
        raise DicomError(f"{source}: pixel data truncated or malformed ({exc})") from None
    return np.asarray(pixels[frame] if frames > 1 else pixels)


def _decoder_message(ds: Dataset, source: str, exc: Exception) -> str:
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    name = syntax.name if syntax is not None else "unknown transfer syntax"
    packages = _DECODERS.get(str(syntax), "a pydicom pixel data plugin for it")
    return f"{source}: pixel data compressed as {name} ({syntax}); install {packages} to decode it ({exc})"


def has_window(ds: Dataset) -> bool:
    """Whether the file stores its own display window (a VOI LUT or a center and width)."""
    return "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)


def site_range(samples: list[np.ndarray]) -> tuple[float, float]:
    """One fixed physical range for a site's files without a window: the 0.5-99.5 percentiles
    of their values, so a lesion stays brighter than normal tissue in every image."""
    values = np.concatenate([s.ravel() for s in samples])
    low, high = np.percentile(values, [0.5, 99.5])
    if not high > low:
        low, high = float(values.min()), float(values.max())
    return float(low), float(high) if high > low else float(low) + 1.0


def physical_sample(ds: Dataset, frame: int, source: str, every: int = 7) -> np.ndarray:
    """A thinned sample of a file's physical pixel values (for ``site_range``)."""
    stored = stored_pixels(ds, frame, source)
    return np.asarray(apply_modality_lut(stored.ravel()[::every], ds), dtype=np.float64)


def _window(
    physical: np.ndarray, ds: Dataset, preprocessing: Preprocessing
) -> tuple[float, float, np.ndarray]:
    """The display range and the values to clip into it, in the VOI LUT's terms."""
    window = preprocessing.window
    if window == "auto" or (window is None and not has_window(ds)):
        if preprocessing.range is not None:
            return (*preprocessing.range, physical)
        return float(physical.min()), float(physical.max()), physical  # a lone file
    if window is None and "VOILUTSequence" in ds:
        lut = ds.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2])
        return 0.0, float(2**bits - 1), np.asarray(apply_voi_lut(physical, ds), dtype=np.float64)
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        window = stored_window(ds)
    assert isinstance(window, tuple)
    center, width = window
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return center - width / 2, center + width / 2, physical


def stored_window(ds: Dataset) -> tuple[float, float]:
    """The file's default (first) (center, width) window."""
    return _first(ds.WindowCenter), _first(ds.WindowWidth)


def _first(value: object) -> float:
    """WindowCenter/WindowWidth may hold several windows; the first is the default one."""
    if isinstance(value, (list, tuple, MultiValue)):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]
