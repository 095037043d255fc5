"""A site's studies from its PACS, as training data: retrieved into the mirror on the site's disk
(``edge_agent.data.pacs``), then loaded as a DICOM folder (instances) or a folder of volumes
(series) by the same code as files a person exported."""

from __future__ import annotations

from edge_agent.data.dicom_source import (
    load_dicom_folder,
    patient_split,
    read_labels,
    with_site_range,
)
from edge_agent.data.pacs import retrieve_labelled
from edge_agent.data.settings import (
    DicomData,
    DicomWebData,
    LabelledImages,
    VolumeData,
    VolumePreprocessing,
)
from edge_agent.data.site_data import Collector, LoadSummary, SiteData
from edge_agent.data.volume_source import load_volume_site


def load_dicomweb_site(config: DicomWebData) -> tuple[SiteData, LoadSummary]:
    """Retrieve one site's labelled instances (or series) from its PACS, then load them as a
    folder of images (or of volumes)."""
    labels = read_labels(config)
    summary = LoadSummary()
    retrieval = retrieve_labelled(config, labels, Collector(config.on_bad_input, summary))
    summary.retrieval = retrieval.describe()
    kept = {uid: labels[uid] for uid in retrieval.files}
    shared = config.model_dump(include=set(LabelledImages.model_fields) - {"preprocessing"})
    if isinstance(config.preprocessing, VolumePreprocessing):
        volumes = VolumeData(
            folder=config.cache_dir / "series",
            labels=config.labels,
            cache_dir=config.cache_dir / "decoded-volumes",
            preprocessing=config.preprocessing,
            **shared,
        )
        series = sorted(p for folder in retrieval.files.values() for p in folder.glob("*.dcm"))
        return load_volume_site(volumes, files=series, labels=kept, summary=summary)
    mirror = DicomData(
        folder=config.cache_dir / "instances",
        labels=config.labels,
        key="sop_instance_uid",
        cache_dir=config.cache_dir / "decoded",
        preprocessing=config.preprocessing,
        **shared,
    )
    files = sorted(retrieval.files.values())
    mirror = with_site_range(mirror, files)
    x, y, patients, summary = load_dicom_folder(mirror, files=files, labels=kept, summary=summary)
    return patient_split(x, y, patients, mirror), summary
