"""A DICOM series or a NIfTI file to one training volume, on one grid for every site.

CT and MR studies are stacks of slices, and every scanner stacks them differently: slice
thickness, pixel spacing, field of view, gantry tilt, orientation. A volume is therefore first
placed in the patient's world by its voxel-to-world affine (millimetres, NIfTI's RAS+: x grows
towards the patient's right, y anterior, z superior; DICOM's LPS+ is flipped into it), then
sampled onto the grid the site's preprocessing declares:
``spacing`` mm per voxel and ``size`` voxels, axis-aligned, centred on the volume's centre. That
one step resamples, reorients (a flipped or oblique acquisition, a non-diagonal affine) and
crops or pads (with 0, the bottom of the window) at once. Trilinear interpolation, after a
Gaussian pre-filter along the axes being thinned so that downsampling does not alias.

A DICOM series (PS3.3 C.7.6.2) becomes a volume thus:

1. the slices must agree on ImageOrientationPatient, PixelSpacing, Rows and Columns;
2. they are sorted by ImagePositionPatient projected on the slice normal (row x column
   cosines), never by file name or InstanceNumber, which scanners and exports reorder;
3. the gaps between neighbours must be even: a gap of about two or more (a slice missing), two
   slices at one position, or gaps that differ by more than ``SPACING_TOLERANCE`` refuse the
   series, naming it; one slice is not a volume and is refused too;
4. each slice goes through the Modality LUT (slope, intercept: Hounsfield units for CT).

Intensities then go through the window (``preprocessing.window``, else the series' stored
window, else the site's ``range``) to [0, 1], as 2-D images do, and ``(x - mean) / std``.
Everything that goes wrong raises ``VolumeError`` naming the series or file and what was
expected.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut
from scipy import ndimage

from edge_agent.data.dicom import DicomError, site_range, stored_pixels, stored_window
from edge_agent.data.settings import VolumePreprocessing

# Gaps between neighbouring slices may differ by this fraction of the median gap (rounding in
# ImagePositionPatient); anything larger is a series that was not acquired as one stack.
SPACING_TOLERANCE = 0.1
MIN_CONTRAST = 1e-3
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class VolumeError(ValueError):
    """A series or file that cannot become a training volume; ``reason`` is a short category."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Volume:
    """Physical values on the acquisition's voxel grid, and where each voxel is (RAS mm)."""

    values: np.ndarray  # float64, three voxel axes
    affine: np.ndarray  # 4x4: voxel index (i, j, k, 1) -> world (x, y, z, 1), RAS
    window: tuple[float, float] | None = None  # (low, high) the series stores, if any


# -- DICOM series ---------------------------------------------------------------------------


def series_volume(slices: Sequence[Dataset], source: str) -> Volume:
    """The volume of one series' slices (any order); ``VolumeError`` naming ``source``."""
    if len(slices) < 2:
        raise VolumeError(
            "single slice",
            f"{source}: a series of {len(slices)} slice; a volume needs at least two "
            "(use source: dicom for single images)",
        )
    geometry = [_slice_geometry(ds, source) for ds in slices]
    orientation, pixel_spacing, shape = geometry[0][:3]
    for other in geometry[1:]:
        if not np.allclose(other[0], orientation, atol=1e-4):
            raise VolumeError("mixed orientation", f"{source}: slices differ in orientation")
        if not np.allclose(other[1], pixel_spacing, rtol=1e-4) or other[2] != shape:
            raise VolumeError(
                "mixed pixel spacing",
                f"{source}: slices differ in pixel spacing or size "
                f"({list(pixel_spacing)} {shape} and {list(other[1])} {other[2]})",
            )
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    positions = np.array([g[3] for g in geometry])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    gap = _even_gap(along[order], source)
    first = positions[order[0]]
    # Voxel (k, r, c) is at first + k*gap*normal + r*dy*column_cosine + c*dx*row_cosine (LPS).
    affine = np.eye(4)
    affine[:3, 0] = normal * gap
    affine[:3, 1] = column_cosine * pixel_spacing[0]
    affine[:3, 2] = row_cosine * pixel_spacing[1]
    affine[:3, 3] = first
    values = np.stack([_physical(slices[i], source) for i in order])
    return Volume(values, _LPS_TO_RAS @ affine, _stored_window(slices[order[0]]))


def _slice_geometry(
    ds: Dataset, source: str
) -> tuple[np.ndarray, np.ndarray, tuple[int, int], np.ndarray]:
    try:
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        spacing = np.array([float(v) for v in ds.PixelSpacing])
        shape = (int(ds.Rows), int(ds.Columns))
    except (AttributeError, TypeError, ValueError):
        raise VolumeError(
            "no geometry",
            f"{source}: a slice without ImageOrientationPatient, ImagePositionPatient, "
            "PixelSpacing, Rows or Columns; a volume needs them all",
        ) from None
    if orientation.shape != (6,) or position.shape != (3,) or spacing.shape != (2,):
        raise VolumeError("no geometry", f"{source}: malformed slice geometry")
    if not (spacing > 0).all():
        raise VolumeError("no geometry", f"{source}: PixelSpacing {list(spacing)} not positive")
    return orientation, spacing, shape, position


def _even_gap(along: np.ndarray, source: str) -> float:
    """The slice spacing of sorted positions; uneven, duplicate or missing slices refused."""
    gaps = np.diff(along)
    spacing = float(np.median(gaps))
    if spacing <= 1e-6 or float(gaps.min()) <= 1e-3 * max(spacing, 1e-3):
        raise VolumeError(
            "duplicate slice", f"{source}: two slices at one position along the slice normal"
        )
    worst = int(np.argmax(np.abs(gaps - spacing)))
    if abs(float(gaps[worst]) - spacing) <= SPACING_TOLERANCE * spacing:
        return spacing
    if gaps[worst] > 1.5 * spacing:
        raise VolumeError(
            "missing slice",
            f"{source}: a gap of {gaps[worst]:.3g} mm after slice {worst + 1} of {len(along)} "
            f"where the others are {spacing:.3g} mm: a slice is missing",
        )
    raise VolumeError(
        "uneven slice spacing",
        f"{source}: slice gaps from {gaps.min():.3g} to {gaps.max():.3g} mm; a volume needs "
        "one spacing",
    )


def _physical(ds: Dataset, source: str) -> np.ndarray:
    try:
        stored = stored_pixels(ds, 0, source)
    except DicomError as exc:
        raise VolumeError("unreadable slice", str(exc)) from None
    physical = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        physical = physical.max() + physical.min() - physical  # bright = dense, as in 2-D
    return physical


def _stored_window(ds: Dataset) -> tuple[float, float] | None:
    """The series' own display range (low, high), from its first slice's default window."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = stored_window(ds)
    return (center - width / 2, center + width / 2) if width > 0 else None


# -- NIfTI ------------------------------------------------------------------------------------


def nifti_volume(data: bytes | Path, source: str) -> Volume:
    """A NIfTI-1 or NIfTI-2 file (or its bytes, gzipped or not) as a volume."""
    import nibabel  # noqa: PLC0415 - only sites with NIfTI files pay for it
    from nibabel.spatialimages import HeaderDataError  # noqa: PLC0415

    # nibabel prints header problems to stderr itself; the VolumeError below says it once.
    logging.getLogger("nibabel.global").setLevel(logging.CRITICAL + 1)
    from nibabel.wrapstruct import WrapStructError  # noqa: PLC0415

    # nibabel prints header problems to stderr itself; the VolumeError below says it once.
    logging.getLogger("nibabel.global").setLevel(logging.CRITICAL + 1)
    try:
        raw = data.read_bytes() if isinstance(data, Path) else data
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        if raw[344:348] == b"n+1\x00":
            image = nibabel.Nifti1Image.from_bytes(raw)
        elif raw[4:8] == b"n+2\x00":
            image = nibabel.Nifti2Image.from_bytes(raw)
        else:
            raise VolumeError("not NIfTI", f"{source}: not a NIfTI file (no n+1 or n+2 magic)")
        values = np.asarray(image.get_fdata(dtype=np.float64))
    except (OSError, EOFError, ValueError, HeaderDataError, WrapStructError) as exc:
        if isinstance(exc, VolumeError):
            raise
        raise VolumeError("not NIfTI", f"{source}: not a readable NIfTI file ({exc})") from None
    if values.ndim == 4 and values.shape[3] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise VolumeError(
            "not 3-D", f"{source}: a {values.ndim}-D image {list(values.shape)}; expected 3-D"
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError("no geometry", f"{source}: its affine is singular or not finite")
    if not np.isfinite(values).all():
        raise VolumeError("not finite", f"{source}: holds NaN or infinite values")
    return Volume(values, affine)


# -- onto the plan's grid -------------------------------------------------------------------


def to_tensor(volume: Volume, pre: VolumePreprocessing, source: str) -> torch.Tensor:
    """The model's input [1, depth, height, width] from a volume."""
    low, high = display_range(volume, pre)
    scaled = (np.clip(volume.values, low, high) - low) / max(high - low, 1e-12)
    if float(scaled.std()) < MIN_CONTRAST:
        raise VolumeError(
            "constant image",
            f"{source}: decodes to a constant volume after the window {low:g}..{high:g}; "
            "set preprocessing.window or range",
        )
    grid = resample(scaled, volume.affine, pre.spacing, pre.size)
    image = torch.from_numpy(grid.astype(np.float32))[None]
    return pre.standardise(image.clamp(0, 1))


def display_range(volume: Volume, pre: VolumePreprocessing) -> tuple[float, float]:
    """The physical values shown as 0..1: the window, else the stored one, else the range."""
    window = pre.window
    if isinstance(window, tuple):
        center, width = window
        return center - width / 2, center + width / 2
    if window is None and volume.window is not None:
        return volume.window
    if pre.range is not None:
        return pre.range
    return site_range([volume.values.ravel()[::7]])  # a lone volume: its own percentiles


def resample(
    values: np.ndarray,
    affine: np.ndarray,
    spacing: tuple[float, float, float],
    size: tuple[int, int, int],
) -> np.ndarray:
    """``values`` sampled on an axis-aligned RAS grid: ``size`` voxels of ``spacing`` mm,
    output axes the world's (z, y, x), centred on the volume's centre."""
    depth, height, width = size
    dz, dy, dx = spacing
    centre = affine @ np.append((np.array(values.shape) - 1) / 2, 1.0)
    # Output index (d, h, w) -> world: x along w, y along h, z along d, about the centre.
    out_to_world = np.zeros((4, 4))
    out_to_world[0, 2], out_to_world[1, 1], out_to_world[2, 0] = dx, dy, dz
    out_to_world[:3, 3] = centre[:3] - out_to_world[:3, :3] @ ((np.array(size) - 1) / 2)
    out_to_world[3, 3] = 1.0
    out_to_voxel = np.linalg.inv(affine) @ out_to_world
    smoothed = ndimage.gaussian_filter(values, _antialias(out_to_voxel), mode="nearest")
    sampled: np.ndarray = ndimage.affine_transform(
        smoothed,
        out_to_voxel[:3, :3],
        offset=out_to_voxel[:3, 3],
        output_shape=(depth, height, width),
        order=1,
        mode="constant",
        cval=0.0,
    )
    return sampled


def _antialias(out_to_voxel: np.ndarray) -> list[float]:
    """Per input axis, a Gaussian sigma for how many input voxels one output step spans."""
    step = np.abs(out_to_voxel[:3, :3]).max(axis=1)  # input voxels per output voxel, per axis
    return [max(0.0, (s - 1.0) / 2.0) for s in step]


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)
