"""Images per second through the DICOM source, against the training step rate of the ``cnn``;
studies per second from a PACS over DICOMweb against the same files on disk; 3-D volumes per
second, first load and cached.

    python bench/data_loading.py [--write-docs] [--quick]

Writes one site of ``medsplit dicom-synth`` images (64x64, the demo's size, and 512x512, a more
realistic radiograph) and loads it through the same ``dicom`` source an agent uses: decoding,
Modality and VOI LUT, MONOCHROME1 inversion, resizing to 64x64, labels and the patient split.
Measured without a cache, while filling the decoded-image cache, and from it. The training rate is images per second of
centralized ``cnn`` training steps (batch 32) measured in the same run, with the same number of
threads (all cores). Loading keeps up when its rate is at least the training rate.

The PACS is a real Orthanc with its DICOMweb plugin on loopback (``experiments/orthanc.py``),
filled with the same 512x512 files: the site's first start retrieves every instance (QIDO-RS
lookups, four WADO-RS retrievals at a time, written to the mirror) and decodes it; a restart
finds them on disk. Volumes are ``dicom-synth --volumes`` CT series sampled onto a 32x64x64 grid.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import bench_main, machine
from edge_agent.data.dicom_source import DicomData, load_dicom_site
from edge_agent.data.dicom_synth import synthesize_site
from edge_agent.data.pacs_source import load_dicomweb_site
from edge_agent.data.settings import DicomWebData, VolumeData
from edge_agent.data.volume_source import load_volume_site
from edge_agent.data.volume_synth import synthesize_volumes
from experiments.orthanc import Orthanc
from medsplit.config import OptimizerConfig
from medsplit.training import make_optimizer, train_epochs
from models import load_plan

CLASSES = ["normal", "lesion"]


def load_rate(folder: Path, cache: Path | None) -> float:
    config = DicomData(folder=folder, classes=CLASSES, cache_dir=cache)
    started = time.perf_counter()
    data, summary = load_dicom_site(config)
    elapsed = time.perf_counter() - started
    assert summary.loaded == len(data.y_train) + len(data.y_test)
    return summary.loaded / elapsed


def training_rate(images: int, repeats: int) -> float:
    plan = load_plan("cnn-cxr")
    model = plan.model.build(seed=0)
    optimizer = make_optimizer(model.parameters(), OptimizerConfig())
    x = torch.rand(images, 1, 64, 64)
    y = torch.randint(0, 2, (images,))
    rates = []
    for epoch in range(repeats + 1):  # the first epoch warms up
        started = time.perf_counter()
        train_epochs(model, optimizer, x, y, epochs=1, batch_size=32, seed=0, first_epoch=epoch)
        rates.append(images / (time.perf_counter() - started))
    return statistics.median(rates[1:])


def _timed(load: object) -> tuple[int, float]:
    """(items loaded, seconds) of one call of ``load``."""
    started = time.perf_counter()
    data, summary = load()  # type: ignore[operator]
    elapsed = time.perf_counter() - started
    assert summary.loaded == len(data.y_train) + len(data.y_test)
    return summary.loaded, elapsed


def pacs_rows(tmp: Path, count: int) -> list[str]:
    """Studies per second from Orthanc over DICOMweb, first start and restart, and from disk."""
    folder = synthesize_site(tmp / "pacs-site", 0, count, seed=2, size=512)
    lines = [
        "| source | studies | first start (studies/s) | restart (studies/s) | vs disk, first | vs disk, restart |",
        "|---|---|---|---|---|---|",
    ]
    disk_n, disk_s = _timed(
        lambda: load_dicom_site(DicomData(folder=folder, key="sop_instance_uid", classes=CLASSES))
    )
    disk = disk_n / disk_s
    with Orthanc(tmp / "orthanc") as pacs:
        pacs.upload(sorted(folder.glob("*.dcm")))
        password = tmp / "password"
        password.write_text(pacs.password)
        config = DicomWebData.model_validate(
            {
                "url": pacs.url,
                "labels": folder / "labels.csv",
                "classes": CLASSES,
                "cache_dir": tmp / "pacs-cache",
                "auth": {"username": pacs.user, "password_file": password},
            }
        )
        first_n, first_s = _timed(lambda: load_dicomweb_site(config))
        again_n, again_s = _timed(lambda: load_dicomweb_site(config))
    first, again = first_n / first_s, again_n / again_s
    lines.append(f"| disk (the same files) | {disk_n} | {disk:.0f} | - | 1.0x | - |")
    lines.append(
        f"| Orthanc over DICOMweb | {first_n} | {first:.0f} | {again:.0f} | "
        f"{first / disk:.2f}x | {again / disk:.2f}x |"
    )
    return lines


def volume_rows(tmp: Path, count: int) -> list[str]:
    """CT series per second onto a 32x64x64 grid: first load, filling the cache, from it."""
    (folder,) = synthesize_volumes(tmp / "ct", 1, count, seed=3, size=64)
    grid = {"spacing": [5, 3.5, 3.5], "size": [32, 64, 64], "window": [40, 400]}

    def config(cache: Path | None) -> VolumeData:
        fields = {"folder": folder, "classes": CLASSES, "preprocessing": grid, "cache_dir": cache}
        return VolumeData.model_validate(fields)

    (small,) = synthesize_volumes(tmp / "warm-up-ct", 1, 2, seed=4, size=16)
    load_volume_site(VolumeData(folder=small, classes=CLASSES))  # imports, first-call costs
    plain = _timed(lambda: load_volume_site(config(None)))
    filling = _timed(lambda: load_volume_site(config(tmp / "volume-cache")))
    warm = _timed(lambda: load_volume_site(config(tmp / "volume-cache")))
    rates = [n / s for n, s in (plain, filling, warm)]
    return [
        "| series | first load (volumes/s) | filling the cache | from the cache | cached / first |",
        "|---|---|---|---|---|",
        f"| {plain[0]} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[2]:.0f} | "
        f"{rates[2] / rates[0]:.0f}x |",
    ]


def run(quick: bool) -> str:
    count = 64 if quick else 1024
    lines = [
        "| source images | images | no cache (images/s) | filling the cache | from the cache | cnn training (images/s) | no cache / training | from cache / training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    train = training_rate(count, 2 if quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        load_rate(synthesize_site(Path(tmp) / "warm-up", 0, 8, seed=1), None)  # imports, handlers
        for size in (64, 512):
            folder = synthesize_site(Path(tmp) / f"s{size}", 0, count, seed=0, size=size)
            cache = Path(tmp) / f"cache{size}"
            plain = load_rate(folder, None)
            filling = load_rate(folder, cache)
            warm = load_rate(folder, cache)
            row = (
                f"| {size}x{size} | {count} | {plain:.0f} | {filling:.0f} | {warm:.0f} | {train:.0f} | "
                f"{plain / train:.1f}x | {warm / train:.1f}x |"
            )
            print(row, flush=True)
            lines.append(row)
        pacs = pacs_rows(Path(tmp), 32 if quick else 256)
        volumes = volume_rows(Path(tmp), 4 if quick else 24)
    print("\n".join([*pacs, "", *volumes]), flush=True)
    return "\n".join(
        [
            *lines,
            "",
            "Studies from a PACS: one 512x512 radiograph per study, retrieved from Orthanc and "
            "decoded, against reading the same files from disk:",
            "",
            *pacs,
            "",
            "3-D volumes: `dicom-synth --volumes` CT series (site 1's scanner: 64x64 slices, 32 to "
            "64 per series) sampled onto a 32x64x64 grid of 5x3.5x3.5 mm:",
            "",
            *volumes,
        ]
    )


def intro() -> str:
    return (
        "## Data loading: the DICOM source against the training step rate\n\n"
        "Command: `make bench` (runs `python bench/data_loading.py --write-docs`).\n"
        f"Machine: {machine()}. One site of `medsplit dicom-synth` images loaded through the "
        "`dicom` source (decode, Modality/VOI LUT, MONOCHROME1, resize to 64x64, labels, patient "
        "split); without a cache, while filling the decoded-image cache, and from it. Training: centralized "
        "`cnn` steps of batch 32 on 64x64 images, in the same run. A ratio of 1x or more means "
        "loading keeps up with training. The PACS is a real Orthanc 1.10 with its DICOMweb "
        "plugin on loopback, started by the benchmark."
    )


if __name__ == "__main__":
    bench_main("data_loading", __doc__, intro, run)
