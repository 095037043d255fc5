"""A research group's folder of PNG or JPEG files and its labels table, as one site's data.

The same rules as a DICOM folder (``dicom_source``): the labels table maps each file's path
relative to the folder to a label value; every problem names the file or the row; ``skip``
leaves bad files out and counts them by reason, ``fail`` stops the agent before it joins; the
load summary reports the decoded intensities. Train and test are split by the table's
``patient_column`` when it has one, otherwise by file.
"""

from __future__ import annotations

from pathlib import Path

from edge_agent.data.dicom_source import read_labels, read_patients
from edge_agent.data.inputs import DataCard, ImageInput
from edge_agent.data.pictures import SUFFIXES, PictureError, read_picture, sixteen_bit_range
from edge_agent.data.settings import PictureData
from edge_agent.data.site_data import (
    DataError,
    LabelledSet,
    LoadSummary,
    SiteData,
    split_by_patient,
)


def load_picture_site(config: PictureData) -> tuple[SiteData, LoadSummary]:
    """Decode, label, validate and split one site's folder of pictures."""
    if not config.folder.is_dir():
        raise DataError(f"{config.folder}: not a folder")
    files = _picture_files(config.folder)
    if config.preprocessing.range is None:
        fixed = sixteen_bit_range(files)
        if fixed is not None:
            pre = config.preprocessing.model_copy(update={"range": fixed})
            config = config.model_copy(update={"preprocessing": pre})
    labels = read_labels(config)
    patients_of = read_patients(config)
    found = LabelledSet.of(config, labels, LoadSummary())
    for path in files:
        key = path.relative_to(config.folder).as_posix()
        target = found.target(key, str(path))
        if target is None:
            continue
        try:
            image = read_picture(path, config.preprocessing, config.channels, str(path))
        except PictureError as exc:
            found.collect.problem(exc.reason, str(exc))
            continue
        found.add(image, target, patients_of.get(key, key))
    x, y, patients = found.finish(config.folder)
    summary = found.collect.summary
    if len(set(patients)) < 2:
        raise DataError(f"{config.folder}: images of one patient; a train/test split needs two")
    train, test = split_by_patient(patients, config.test_fraction, config.seed)
    encoding = ImageInput(
        kind="picture", channels=config.channels, preprocessing=config.preprocessing
    )
    card = DataCard(input=encoding, classes=config.classes, multilabel=config.multilabel)
    return SiteData(x[train], y[train], x[test], y[test], card), summary


def _picture_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith(".")
    )
