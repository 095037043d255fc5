"""A hospital's folder of DICOM files and its table of labels, as one site's training data.

``labels.csv`` maps a key -- the file's path relative to the folder, its SOPInstanceUID, or its
PatientID -- to a label value; the job fixes the label values (``classes``) so that every site
encodes them alike. Every problem names the file or the CSV row: unreadable or truncated files,
missing pixel data, labels for missing files, files without labels, unknown label values, a
class absent at the site, wrong column names. With ``on_bad_input: skip`` bad files are left out
and counted by reason in a ``LoadSummary``; with ``fail`` the first problems stop the agent at
start-up, before it joins the job. Train and test are split by PatientID, so no patient is on
both sides. Nothing read here -- no header value, no file name -- is ever sent anywhere: only
the decoded images and label indices reach training.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pydicom
import torch
from pydicom.errors import InvalidDicomError

from edge_agent.data.dicom import (
    DicomError,
    has_window,
    physical_sample,
    read_dataset,
    site_range,
    to_image,
)
from edge_agent.data.image_cache import ImageCache
from edge_agent.data.inputs import DataCard, ImageInput
from edge_agent.data.settings import (
    DicomData,
    DicomWebData,
    PictureData,
    VolumeData,
)
from edge_agent.data.site_data import (
    DataError,
    LabelledSet,
    LoadSummary,
    SiteData,
    split_by_patient,
)


def read_labels(config: DicomData | DicomWebData | PictureData | VolumeData) -> dict[str, str]:
    """Key -> label value from the labels CSV, validated row by row."""
    path = config.labels_path
    key_column = config.key_column or config.key
    try:
        handle = path.open(newline="")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the labels table ({exc.strerror})") from None
    with handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in (key_column, config.label_column) if c not in columns]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {missing}; found {columns} "
                f"(set key_column / label_column in the site's data config)"
            )
        labels: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            key, value = (row[key_column] or "").strip(), (row[config.label_column] or "").strip()
            if not key:
                raise DataError(f"{path}, row {line}: empty {key_column!r}")
            if key in labels and labels[key] != value and config.key != "patient_id":
                raise DataError(f"{path}, row {line}: {key!r} is labelled twice")
            labels[key] = value
    if not labels:
        raise DataError(f"{path}: no labelled rows")
    return labels


def read_patients(config: PictureData | VolumeData) -> dict[str, str]:
    """Key -> patient from the labels table's ``patient_column``; empty without one."""
    if config.patient_column is None:
        return {}
    key_column = config.key_column or config.key
    with config.labels_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if config.patient_column not in (reader.fieldnames or []):
            raise DataError(
                f"{config.labels_path}: no column {config.patient_column!r} (patient_column); "
                f"found {reader.fieldnames}"
            )
        return {
            (row[key_column] or "").strip(): (row[config.patient_column] or "").strip()
            for row in reader
        }


def load_dicom_site(config: DicomData) -> tuple[SiteData, LoadSummary]:
    """Decode, label, validate and split one site's DICOM folder."""
    config = with_site_range(config)
    x, y, patients, summary = load_dicom_folder(config)
    return patient_split(x, y, patients, config), summary


def with_site_range(config: DicomData, files: list[Path] | None = None) -> DicomData:
    """``config`` with its preprocessing's ``range`` fixed from this site's own images.

    Needed for files without a stored window (or all files, with ``window: auto``); the range
    then travels in the site's data card, so serving shows an upload as training saw it. Files
    with a window are only read up to their pixel data; unreadable ones are left to the load.
    """
    pre = config.preprocessing
    if pre.range is not None or isinstance(pre.window, tuple):
        return config
    samples = []
    for path in candidate_files(config.folder) if files is None else files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            if pre.window != "auto" and has_window(header):
                continue
            samples.append(physical_sample(read_dataset(path), pre.frame, str(path)))
        except (DicomError, InvalidDicomError, OSError, ValueError, KeyError, AttributeError):
            continue  # the load reports it, with its reason
    if not samples:
        return config
    fixed = pre.model_copy(update={"range": site_range(samples)})
    return config.model_copy(update={"preprocessing": fixed})


def load_dicom_folder(
    config: DicomData,
    *,
    files: list[Path] | None = None,
    labels: dict[str, str] | None = None,
    summary: LoadSummary | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str], LoadSummary]:
    """Decode, label and validate a DICOM folder: images, labels and patients, in file order.

    ``files`` and ``labels`` default to every file in the folder and the folder's table.
    """
    if not config.folder.is_dir():
        raise DataError(f"{config.folder}: not a folder")
    labels = read_labels(config) if labels is None else labels
    summary = LoadSummary() if summary is None else summary
    found = LabelledSet.of(config, labels, summary)
    cache = None if config.cache_dir is None else ImageCache(config.cache_dir, config.preprocessing)
    for path in candidate_files(config.folder) if files is None else files:
        relative = path.relative_to(config.folder).as_posix()
        try:
            # Keyed by file name, an unlabelled file is not read at all.
            decoded = None if config.key == "file" else _decode(path, config, cache)
            key = relative if decoded is None else decoded[1][_HEADER[config.key]]
            target = found.target(key, str(path))
            if target is None:
                continue
            image, header = decoded or _decode(path, config, cache)
        except DicomError as exc:
            found.collect.problem(_reason(exc), str(exc))
            continue
        found.add(image, target, header["PatientID"] or relative)
    x, y, patients = found.finish(config.folder)
    return x, y, patients, summary


def candidate_files(folder: Path) -> list[Path]:
    """Every file under the folder but tables (.csv), hidden files and DICOMDIR indexes."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() != ".csv"
        and not p.name.startswith(".")
        and p.name.upper() != "DICOMDIR"
    )


_HEADER = {"sop_instance_uid": "SOPInstanceUID", "patient_id": "PatientID"}


def _decode(
    path: Path, config: DicomData, cache: ImageCache | None
) -> tuple[torch.Tensor, dict[str, str]]:
    """The file's image and the two header values loading needs, from the cache when it can."""
    cached = None if cache is None else cache.get(path)
    if cached is not None:
        return cached
    ds = read_dataset(path)
    header = {name: str(ds.get(name, "")) for name in _HEADER.values()}
    image = to_image(ds, config.preprocessing, source=str(path))
    if cache is not None:
        cache.put(path, image, header)
    return image, header


def _reason(exc: DicomError) -> str:
    text = str(exc)
    for reason in (
        "not a DICOM file",
        "truncated",
        "no pixel data",
        "compressed",
        "photometric",
        "frame",
        "constant image",
    ):
        if reason in text:
            return reason
    return "unreadable"


def patient_split(
    x: torch.Tensor, y: torch.Tensor, patients: list[str], config: DicomData
) -> SiteData:
    if len(set(patients)) < 2:
        raise DataError(
            f"{config.folder}: images of {len(set(patients))} patient(s); a train/test split needs at least 2"
        )
    train, test = split_by_patient(patients, config.test_fraction, config.seed)
    encoding = ImageInput(preprocessing=config.preprocessing)
    card = DataCard(input=encoding, classes=config.classes, multilabel=config.multilabel)
    return SiteData(x[train], y[train], x[test], y[test], card)
