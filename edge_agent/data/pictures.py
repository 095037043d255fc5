"""A PNG or JPEG file to one training image: what research groups keep instead of DICOM.

Pillow reads the file; the pixels become the model's input as DICOM's do, minus the DICOM LUTs:

* 8-bit files (grayscale, RGB, palette, with or without alpha) are scaled from 0..255 to 0..1;
* 16-bit grayscale PNG (an exported radiograph keeps its 12 or 16 bits this way) goes through
  the site's one ``range`` -- from the 0.5-99.5 percentiles of the site's 16-bit files, as for
  DICOM files without a window -- never each image's own extent;
* ``channels: 1`` turns colour into luminance (ITU-R 601, Pillow's ``L``); ``channels: 3``
  repeats a grayscale image in three channels; alpha is dropped;
* resized to ``size`` x ``size`` with area averaging, then ``(x - mean) / std``.

Everything that goes wrong raises ``PictureError`` naming the file and what was expected: not
an image, not PNG or JPEG, truncated, a mode Pillow cannot turn into gray or RGB, a flat image.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from edge_agent.data.dicom import site_range
from edge_agent.data.settings import Preprocessing

FORMATS = ("PNG", "JPEG")
SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_CONTRAST = 1e-3
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


class PictureError(ValueError):
    """A picture that cannot become a training image; ``reason`` is a short category."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def open_picture(data: bytes | Path, source: str) -> Image.Image:
    """The decoded picture (pixels loaded), refusing anything but a whole PNG or JPEG file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            picture.load()
    except UnidentifiedImageError:
        raise PictureError("not an image", f"{source}: not a PNG or JPEG file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PictureError("too large", f"{source}: {exc}") from None
    except OSError as exc:
        raise PictureError("truncated", f"{source}: truncated or corrupt ({exc})") from None
    if picture.format not in FORMATS:
        raise PictureError(
            "not PNG or JPEG", f"{source}: a {picture.format} file; expected PNG or JPEG"
        )
    return picture


def physical_values(picture: Image.Image, channels: int, source: str) -> np.ndarray:
    """The picture as float64 [channels, H, W], in its own units (0..255, or 0..65535)."""
    if picture.mode in _SIXTEEN_BIT:
        gray = np.asarray(picture, dtype=np.float64)
        return np.repeat(gray[None], channels, axis=0)
    target = "L" if channels == 1 else "RGB"
    try:
        converted = picture.convert(target)
    except (ValueError, OSError) as exc:
        raise PictureError(
            "unsupported mode",
            f"{source}: pixel mode {picture.mode!r} cannot become {target} ({exc})",
        ) from None
    values = np.asarray(converted, dtype=np.float64)
    return values[None] if values.ndim == 2 else values.transpose(2, 0, 1)


def is_sixteen_bit(picture: Image.Image) -> bool:
    return picture.mode in _SIXTEEN_BIT


def to_tensor(
    picture: Image.Image, preprocessing: Preprocessing, channels: int, source: str
) -> torch.Tensor:
    """The model's input [channels, size, size] from a loaded picture."""
    values = physical_values(picture, channels, source)
    if is_sixteen_bit(picture):
        low, high = preprocessing.range or (float(values.min()), float(values.max()))
    else:
        low, high = 0.0, 255.0
    scaled = (np.clip(values, low, high) - low) / max(high - low, 1e-12)
    if float(scaled.std()) < MIN_CONTRAST:
        raise PictureError(
            "constant image",
            f"{source}: decodes to a constant image (every pixel {float(scaled.mean()):.3g} "
            f"after the range {low:g}..{high:g})",
        )
    image = torch.from_numpy(scaled.astype(np.float32))[None]
    size = preprocessing.size
    if image.shape[-2:] != (size, size):
        image = torch.nn.functional.interpolate(image, size=(size, size), mode="area")
    return preprocessing.standardise(image[0].clamp(0, 1))


def read_picture(
    data: bytes | Path, preprocessing: Preprocessing, channels: int, source: str
) -> torch.Tensor:
    """A PNG or JPEG file's bytes (or path) as the model's input [channels, size, size]."""
    return to_tensor(open_picture(data, source), preprocessing, channels, source)


def sixteen_bit_range(files: list[Path]) -> tuple[float, float] | None:
    """One range for a site's 16-bit pictures (0.5-99.5 percentiles); None without any."""
    samples = []
    for path in files:
        try:
            picture = open_picture(path, str(path))
        except PictureError:
            continue  # the load reports it, with its reason
        if is_sixteen_bit(picture):
            samples.append(np.asarray(picture, dtype=np.float64).ravel()[::7])
    return site_range(samples) if samples else None
