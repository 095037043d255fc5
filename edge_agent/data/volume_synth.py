"""``medsplit dicom-synth --volumes``: CT-like series, each hospital's scanner stacking them its
own way.

A phantom is drawn in the patient's world (millimetres): an elliptic body of soft tissue
(40 HU) in air (-1000 HU) with a denser organ, and, in "lesion" studies, a sphere of 140 HU
somewhere inside. Each site samples it on its own scanner's grid and writes one CT Image Storage
file per slice, so that decoding has real work to do:

* slice thickness differs per site (``size`` / 2 to ``size`` slices over 160 mm: 2.5 to 5 mm
  at 64), and pixel spacing (a 220 mm field of view, give or take 10%);
* site 2 lists its slices from head to feet, site 3 is acquired with a 12 degree gantry tilt
  (oblique ImageOrientationPatient), site 4 with rows and columns flipped;
* stored values use each site's bit depth, rescale slope and intercept (``Encoding``); sites 1
  and 3 store a soft-tissue window (40/400), the others none;
* file names are shuffled against slice position and InstanceNumber runs backwards on some
  sites: only ImagePositionPatient orders a series.

Layout: ``OUT/site-N/<study>/slice-XXX.dcm`` and ``OUT/site-N/labels.csv`` with the columns
``series_instance_uid``, ``patient_id``, ``folder`` and ``label`` (``normal`` or ``lesion``).
"""

from __future__ import annotations

import csv
import datetime
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import UID, generate_uid

from edge_agent.data.dicom_synth import LABELS, Encoding, new_dataset, save_dataset
from medsplit.storage import atomic_write

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
FIELD_MM = (220.0, 220.0, 160.0)  # x, y extent of a slice; z extent of a series


@dataclass(frozen=True)
class CtScanner:
    """How one site's CT scanner lays out a series."""

    thickness: float  # mm between slices
    pixel: float  # mm per pixel
    tilt_deg: float  # rotation of the slice plane about the patient's left-right axis
    reversed_listing: bool  # slices written head to feet
    flipped: bool  # rows and columns run the other way
    window: bool  # whether a soft-tissue window is stored
    encoding: Encoding

    @classmethod
    def for_site(cls, index: int, seed: int, size: int) -> CtScanner:
        rng = np.random.default_rng([seed, index, 0xC7])
        bits, slope, intercept = [(12, 1.0, -1024.0), (16, 0.5, -2048.0), (12, 1.0, -1000.0)][
            index % 3
        ]
        return cls(
            thickness=round(FIELD_MM[2] / (size * float(rng.choice([0.5, 0.6, 0.8, 1.0]))), 3),
            pixel=round(FIELD_MM[0] / size * float(rng.uniform(0.9, 1.1)), 3),
            tilt_deg=12.0 if index % 4 == 2 else 0.0,
            reversed_listing=index % 4 == 1,
            flipped=index % 4 == 3,
            window=index % 2 == 0,
            encoding=Encoding(bits, slope, intercept, "MONOCHROME2", 0.0, 0.0),
        )

    def orientation(self) -> tuple[np.ndarray, np.ndarray]:
        """Row and column direction cosines (LPS), as ImageOrientationPatient holds them."""
        tilt = np.deg2rad(self.tilt_deg)
        row = np.array([1.0, 0.0, 0.0])
        column = np.array([0.0, np.cos(tilt), np.sin(tilt)])
        return (-row, -column) if self.flipped else (row, column)


@dataclass(frozen=True)
class Phantom:
    """A body with an organ and perhaps a lesion, in LPS millimetres about the origin."""

    body: np.ndarray  # semi-axes (x, y, z)
    organ_centre: np.ndarray
    lesion_centre: np.ndarray | None
    lesion_radius: float

    @classmethod
    def draw(cls, rng: np.random.Generator, lesion: bool) -> Phantom:
        body = np.array([95.0, 75.0, 70.0]) * rng.uniform(0.85, 1.1, size=3)
        organ = rng.uniform(-0.3, 0.3, size=3) * body
        centre = rng.uniform(-0.45, 0.45, size=3) * body if lesion else None
        return cls(body, organ, centre, float(rng.uniform(14.0, 22.0)))

    def hounsfield(self, points: np.ndarray) -> np.ndarray:
        """HU at world points [..., 3]."""
        inside = (((points / self.body) ** 2).sum(-1)) <= 1.0
        values = np.where(inside, 40.0, -1000.0)
        organ = (((points - self.organ_centre) / (self.body * 0.35)) ** 2).sum(-1) <= 1.0
        values = np.where(organ & inside, 70.0, values)
        if self.lesion_centre is not None:
            lesion = np.linalg.norm(points - self.lesion_centre, axis=-1) <= self.lesion_radius
            values = np.where(lesion & inside, 140.0, values)
        return values


def write_series(
    folder: Path,
    phantom: Phantom,
    scanner: CtScanner,
    rng: np.random.Generator,
    *,
    size: int,
    patient_id: str,
    study_date: str,
) -> str:
    """One series of slices in ``folder``; returns its SeriesInstanceUID."""
    row, column = scanner.orientation()
    normal = np.cross(row, column)
    slices = int(FIELD_MM[2] / scanner.thickness)
    origin = -(row + column) * (size - 1) / 2 * scanner.pixel - normal * (slices - 1) / 2 * (
        scanner.thickness
    )
    grid = np.arange(size) * scanner.pixel
    plane = grid[:, None, None] * column + grid[None, :, None] * row  # [rows, cols, 3]
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    order = range(slices - 1, -1, -1) if scanner.reversed_listing else range(slices)
    names = rng.permutation(slices)
    folder.mkdir(parents=True, exist_ok=True)
    for listed, k in enumerate(order):
        position = origin + normal * k * scanner.thickness
        hu = phantom.hounsfield(position + plane) + rng.normal(0, 12.0, size=(size, size))
        ds = new_dataset(
            scanner.encoding.stored_from_physical(hu),
            scanner.encoding,
            sop_class=CT_IMAGE_STORAGE,
            modality="CT",
            patient_id=patient_id,
            patient_name=f"Synthetic^{patient_id}",
            study_date=study_date,
        )
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.InstanceNumber = listed + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.RescaleType = "HU"
        ds.SliceThickness = scanner.thickness
        ds.PixelSpacing = [scanner.pixel, scanner.pixel]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row, *column)]
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.SliceLocation = round(float(position @ normal), 4)
        if scanner.window:
            ds.WindowCenter, ds.WindowWidth = 40, 400
        save_dataset(folder / f"slice-{names[listed]:03d}.dcm", ds)
    return str(series_uid)


def synthesize_volume_site(
    out: Path, index: int, count: int, *, seed: int = 0, size: int = 32
) -> Path:
    """One site's series and its labels.csv; returns the site's folder."""
    scanner = CtScanner.for_site(index, seed, size)
    rng = np.random.default_rng([seed, index, 0x3D])
    folder = out / f"site-{index + 1}"
    rows = []
    for i in range(count):
        label = i % 2 if count > 1 else int(rng.integers(0, 2))
        patient_id = f"S{index + 1}-P{i + 1:04d}"
        date = datetime.date(2020, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 2500)))
        study = f"study-{i + 1:04d}"
        uid = write_series(
            folder / study,
            Phantom.draw(rng, lesion=label == 1),
            scanner,
            rng,
            size=size,
            patient_id=patient_id,
            study_date=date.strftime("%Y%m%d"),
        )
        rows.append((uid, patient_id, study, LABELS[label]))
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(("series_instance_uid", "patient_id", "folder", "label"))
    writer.writerows(rows)
    atomic_write(folder / "labels.csv", table.getvalue().encode())
    return folder


def synthesize_volumes(
    out: Path, sites: int, per_site: int, *, seed: int = 0, size: int = 32
) -> list[Path]:
    if sites < 1 or per_site < 1:
        raise ValueError(
            f"need at least one site and one series per site, got {sites} x {per_site}"
        )
    if size < 8:
        raise ValueError(f"--size: at least 8 pixels per row, got {size}")
    return [synthesize_volume_site(out, i, per_site, seed=seed, size=size) for i in range(sites)]
