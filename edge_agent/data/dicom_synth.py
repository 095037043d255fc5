"""``medsplit dicom-synth``: chest-radiograph-like DICOM files, as different hospitals make them.

Each site gets its own scanner: bit depth (``BitsStored`` 12 or 16), photometric interpretation
(``MONOCHROME1`` or ``MONOCHROME2``), rescale slope and intercept, pixel spacing, noise level,
and an imaging chain (contrast, brightness, gamma; ``edge_agent.data.partitions.Scanner``). The files
are valid DICOM that other tools open: file meta, CR Image Storage SOP class, fresh UIDs,
PatientID/PatientName, StudyDate, PixelSpacing, a default window. Decoded by
``edge_agent.data.dicom`` every site's images look alike again (bright = dense), except for what a real
scanner leaves: noise and tone.

Layout: ``OUT/site-N/IMAGE.dcm`` and ``OUT/site-N/labels.csv`` with the columns ``file``,
``sop_instance_uid``, ``patient_id`` and ``label`` (``normal`` or ``lesion``).
"""

from __future__ import annotations

import csv
import datetime
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from edge_agent.data.partitions import Scanner
from edge_agent.data.synthetic import synthetic_cxr
from medsplit.storage import atomic_write

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
LABELS = ("normal", "lesion")
PHYSICAL_MAX = 1000.0  # physical units spanned by an image; the default window covers them


@dataclass(frozen=True)
class Encoding:
    """How one scanner stores physical values: stored = (physical - intercept) / slope."""

    bits_stored: int
    slope: float
    intercept: float
    photometric: str
    pixel_spacing: float  # mm
    noise: float  # standard deviation added before quantisation, in image units (0..1)

    @classmethod
    def for_site(cls, index: int, seed: int) -> Encoding:
        rng = np.random.default_rng([seed, index, 0xD1C0])
        # Every combination fits its physical range [0, PHYSICAL_MAX] in BitsStored.
        bits, slope, intercept = [
            (12, 0.5, -1024.0),
            (12, 1.0, 0.0),
            (16, 0.05, 0.0),
            (16, 1.0, -1000.0),
        ][index % 4]
        return cls(
            bits_stored=bits,
            slope=slope,
            intercept=intercept,
            photometric="MONOCHROME1" if index % 2 else "MONOCHROME2",
            pixel_spacing=round(float(rng.uniform(0.14, 0.2)), 3),
            noise=float(rng.uniform(0.0, 0.04)),
        )

    def stored_values(self, image: np.ndarray) -> np.ndarray:
        """Image (0..1, bright = dense) to the uint16 values this scanner writes."""
        shown = 1.0 - image if self.photometric == "MONOCHROME1" else image
        return self.stored_from_physical(shown * PHYSICAL_MAX)

    def stored_from_physical(self, physical: np.ndarray) -> np.ndarray:
        """Physical values (e.g. Hounsfield units) to stored values, clipped to BitsStored."""
        stored = np.rint((physical - self.intercept) / self.slope)
        return np.clip(stored, 0, 2**self.bits_stored - 1).astype(np.uint16)


def new_dataset(
    stored: np.ndarray,
    encoding: Encoding,
    *,
    sop_class: UID,
    modality: str,
    patient_id: str,
    patient_name: str,
    study_date: str,
) -> FileDataset:
    """A valid single-frame image of ``stored`` values: file meta, fresh UIDs, the patient,
    the study, the pixel encoding. Callers add what their IOD needs (geometry, series)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.PatientID, ds.PatientName = patient_id, patient_name
    ds.PatientBirthDate, ds.PatientSex = "", ""  # Type 2: present, unknown
    ds.StudyDate, ds.StudyTime = study_date, "120000"
    ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Manufacturer = "medsplit dicom-synth"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = encoding.photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, encoding.bits_stored, encoding.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = encoding.slope, encoding.intercept
    ds.PixelData = stored.astype("<u2").tobytes()
    return ds


def save_dataset(path: Path, ds: FileDataset) -> None:
    encoded = io.BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    atomic_write(path, encoded.getvalue())


def write_dicom(
    path: Path,
    stored: np.ndarray,
    encoding: Encoding,
    *,
    patient_id: str,
    patient_name: str,
    study_date: str,
) -> str:
    """Write one CR image; returns its SOPInstanceUID."""
    ds = new_dataset(
        stored,
        encoding,
        sop_class=CR_IMAGE_STORAGE,
        modality="CR",
        patient_id=patient_id,
        patient_name=patient_name,
        study_date=study_date,
    )
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.PatientOrientation = ["L", "F"]  # Type 2C: required without image orientation
    ds.RescaleType = "US"  # Type 1C with a rescale: unspecified units
    ds.PixelSpacing = [encoding.pixel_spacing, encoding.pixel_spacing]
    ds.WindowCenter, ds.WindowWidth = PHYSICAL_MAX / 2, PHYSICAL_MAX
    save_dataset(path, ds)
    return str(ds.SOPInstanceUID)


def synthesize_site(out: Path, index: int, count: int, *, seed: int = 0, size: int = 64) -> Path:
    """One site's folder of DICOM files and its labels.csv; returns the folder."""
    images, labels = synthetic_cxr(count, size=size, seed=seed * 1000 + index)
    images = Scanner.for_site(index, seed).apply(images, seed=seed * 1000 + index)
    encoding = Encoding.for_site(index, seed)
    rng = np.random.default_rng([seed, index, 0xFACE])
    noisy = images[:, 0].numpy() + rng.normal(0, encoding.noise, size=images[:, 0].shape)
    folder = out / f"site-{index + 1}"
    write_folder(
        folder, np.clip(noisy, 0, 1), labels.numpy(), encoding, rng, prefix=f"S{index + 1}"
    )
    return folder


def write_folder(
    folder: Path,
    images: np.ndarray,
    labels: np.ndarray,
    encoding: Encoding,
    rng: np.random.Generator,
    *,
    prefix: str,
) -> None:
    """Images (n, rows, cols) in 0..1 as DICOM files plus labels.csv; some patients get two."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    patient = 0
    for i in range(len(images)):
        if i == 0 or rng.random() < 0.7:  # most patients have one image, some two
            patient += 1
        patient_id = f"{prefix}-P{patient:04d}"
        date = datetime.date(2020, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 2500)))
        name = f"image-{i:05d}.dcm"
        uid = write_dicom(
            folder / name,
            encoding.stored_values(images[i]),
            encoding,
            patient_id=patient_id,
            patient_name=f"Synthetic^Patient{prefix}x{patient}",
            study_date=date.strftime("%Y%m%d"),
        )
        rows.append((name, uid, patient_id, LABELS[int(labels[i])]))
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(("file", "sop_instance_uid", "patient_id", "label"))
    writer.writerows(rows)
    atomic_write(folder / "labels.csv", table.getvalue().encode())


def synthesize(
    out: Path, sites: int, per_site: int, *, seed: int = 0, size: int = 64
) -> list[Path]:
    if sites < 1 or per_site < 1:
        raise ValueError(f"need at least one site and one image per site, got {sites} x {per_site}")
    return [synthesize_site(out, i, per_site, seed=seed, size=size) for i in range(sites)]
