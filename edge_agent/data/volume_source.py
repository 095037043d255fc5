"""A site's folder of 3-D volumes -- DICOM series or NIfTI files -- and its labels table.

``format: dicom`` reads every file's header, groups the files into series by
SeriesInstanceUID and labels each series by its UID (the column ``medsplit dicom-synth
--volumes`` writes); ``format: nifti`` labels each ``.nii``/``.nii.gz`` file by its path
relative to the folder. Volumes become tensors on the site's grid (``edge_agent.data.volumes``);
the rules are those of every image source (``site_data.LabelledSet``): every problem names the
series or file, ``skip`` leaves it out and counts it by reason, ``fail`` stops the agent before
it joins. Train and test are split by PatientID (DICOM) or the table's ``patient_column``.

Without a window the site's one intensity ``range`` comes from a first pass over its volumes
(their 0.5-99.5 percentiles), so every volume of a site is shown alike; with ``cache_dir`` the
decoded volumes are kept, keyed by their files and the preprocessing, and a restart reads those.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from edge_agent.data.dicom import site_range
from edge_agent.data.dicom_source import candidate_files, read_labels, read_patients
from edge_agent.data.image_cache import ImageCache
from edge_agent.data.inputs import DataCard, VolumeInput
from edge_agent.data.settings import VolumeData
from edge_agent.data.site_data import (
    Collector,
    DataError,
    LabelledSet,
    LoadSummary,
    SiteData,
    split_by_patient,
)
from edge_agent.data.volumes import (
    Volume,
    VolumeError,
    is_nifti,
    nifti_volume,
    series_volume,
    to_tensor,
)
from medsplit.storage import atomic_write

DECODER = "volume-1"
RANGE_SAMPLES = 200_000  # physical values per volume for the site's range


@dataclass(frozen=True)
class Item:
    """One volume to load: its labels key, its files, its patient (if the files say)."""

    key: str
    files: tuple[Path, ...]
    patient: str


def load_volume_site(
    config: VolumeData,
    *,
    files: list[Path] | None = None,
    labels: dict[str, str] | None = None,
    summary: LoadSummary | None = None,
) -> tuple[SiteData, LoadSummary]:
    """Decode, label, validate and split one site's folder of volumes.

    ``files`` and ``labels`` default to every file in the folder and the folder's table.
    """
    if not config.folder.is_dir():
        raise DataError(f"{config.folder}: not a folder")
    if summary is None:
        summary = LoadSummary()
    summary.unit = "volumes"
    found = LabelledSet.of(config, read_labels(config) if labels is None else labels, summary)
    items = list(_items(config, found.collect, files))
    config = _with_site_range(config, items)
    cache = None
    if config.cache_dir is not None:
        cache = ImageCache(config.cache_dir, config.preprocessing, decoder=DECODER)
    patients_of = read_patients(config)
    for item in items:
        target = found.target(item.key, _name(config, item))
        if target is None:
            continue
        cached = None if cache is None else cache.get(list(item.files))
        if cached is not None:
            volume = cached[0]
        else:
            try:
                volume = to_tensor(_volume(config, item), config.preprocessing, _name(config, item))
            except VolumeError as exc:
                found.collect.problem(exc.reason, str(exc))
                continue
            if cache is not None:
                cache.put(list(item.files), volume, {})
        found.add(volume, target, patients_of.get(item.key, item.patient))
    x, y, patients = found.finish(config.folder)
    if len(set(patients)) < 2:
        raise DataError(f"{config.folder}: volumes of one patient; a train/test split needs two")
    train, test = split_by_patient(patients, config.test_fraction, config.seed)
    encoding = VolumeInput(preprocessing=config.preprocessing)
    card = DataCard(input=encoding, classes=config.classes, multilabel=config.multilabel)
    return SiteData(x[train], y[train], x[test], y[test], card), summary


def _items(config: VolumeData, collect: Collector, files: list[Path] | None) -> Iterator[Item]:
    if config.format == "nifti":
        every = [p for p in config.folder.rglob("*") if p.is_file()] if files is None else files
        for path in sorted(p for p in every if is_nifti(p)):
            key = path.relative_to(config.folder).as_posix()
            yield Item(key, (path,), key)
        return
    series: dict[str, list[Path]] = defaultdict(list)
    patient: dict[str, str] = {}
    for path in candidate_files(config.folder) if files is None else files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(header.SeriesInstanceUID)
        except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError) as exc:
            collect.problem("not a DICOM file", f"{path}: not a DICOM slice ({exc})")
            continue
        series[uid].append(path)
        patient[uid] = str(header.get("PatientID", "")) or uid
    for uid in sorted(series):
        yield Item(uid, tuple(sorted(series[uid])), patient[uid])


def _name(config: VolumeData, item: Item) -> str:
    """How errors name a volume: the NIfTI file, or the series UID and its folder."""
    if config.format == "nifti":
        return str(item.files[0])
    return f"series {item.key} ({item.files[0].parent})"


def _volume(config: VolumeData, item: Item) -> Volume:
    source = _name(config, item)
    if config.format == "nifti":
        return nifti_volume(item.files[0], source)
    slices = []
    for path in item.files:
        try:
            slices.append(pydicom.dcmread(path))
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise VolumeError("unreadable slice", f"{source}: {path.name} ({exc})") from None
    return series_volume(slices, source)


def _with_site_range(config: VolumeData, items: list[Item]) -> VolumeData:
    """``config`` with its ``range`` fixed from the site's own volumes, where one is needed.

    It takes a pass over every volume, so with ``cache_dir`` the range is kept too, keyed by
    every file of the site: a restart with nothing changed reads it instead.
    """
    pre = config.preprocessing
    if pre.range is not None or isinstance(pre.window, tuple):
        return config
    kept = None
    if config.cache_dir is not None:
        every = [path for item in items for path in item.files]
        key = ImageCache(config.cache_dir, pre, DECODER).key(every)
        kept = config.cache_dir / f"range-{key}.json"
    try:
        fixed = _read_range(kept) if kept is not None else _measured_range(config, items)
    except (OSError, ValueError, TypeError):  # not kept yet, or unreadable: measure it again
        fixed = _measured_range(config, items)
        if kept is not None:
            atomic_write(kept, json.dumps(fixed).encode())
    if fixed is None:
        return config
    return config.model_copy(update={"preprocessing": pre.model_copy(update={"range": fixed})})


def _read_range(path: Path) -> tuple[float, float] | None:
    """A range kept by an earlier start: ``[low, high]``, or null when none was needed."""
    kept = json.loads(path.read_text())
    if kept is None:
        return None
    low, high = (float(v) for v in kept)
    return low, high


def _measured_range(config: VolumeData, items: list[Item]) -> tuple[float, float] | None:
    """The 0.5-99.5 percentiles of the site's volumes that have no window of their own."""
    pre = config.preprocessing
    samples = []
    for item in items:
        try:
            volume = _volume(config, item)
        except VolumeError:
            continue  # the load reports it, with its reason
        if pre.window == "auto" or volume.window is None:
            values = volume.values.ravel()
            samples.append(values[:: max(1, values.size // RANGE_SAMPLES)])
    return site_range(samples) if samples else None
