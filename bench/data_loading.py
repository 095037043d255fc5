"""Images per second through the DICOM source, against the training step rate of the ``cnn``.

    python bench/data_loading.py [--write-docs] [--quick]

Writes one site of ``medsplit dicom-synth`` images (64x64, the demo's size, and 512x512, a more
realistic radiograph) and loads it through the same ``dicom`` source an agent uses: decoding,
Modality and VOI LUT, MONOCHROME1 inversion, resizing to 64x64, labels and the patient split.
Measured without a cache, while filling the decoded-image cache, and from it. The training rate is images per second of
centralized ``cnn`` training steps (batch 32) measured in the same run, with the same number of
threads (all cores). Loading keeps up when its rate is at least the training rate.
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
    return "\n".join(lines)


def intro() -> str:
    return (
        "## Data loading: the DICOM source against the training step rate\n\n"
        "Command: `make bench` (runs `python bench/data_loading.py --write-docs`).\n"
        f"Machine: {machine()}. One site of `medsplit dicom-synth` images loaded through the "
        "`dicom` source (decode, Modality/VOI LUT, MONOCHROME1, resize to 64x64, labels, patient "
        "split); without a cache, while filling the decoded-image cache, and from it. Training: centralized "
        "`cnn` steps of batch 32 on 64x64 images, in the same run. A ratio of 1x or more means "
        "loading keeps up with training."
    )


if __name__ == "__main__":
    bench_main("data_loading", __doc__, intro, run)
