"""Split learning's overhead where compute dominates: a DenseNet-121 on 224 px images.

    python bench/split_overhead_heavy.py [--write-docs] [--quick]

The same measurement as ``bench/split_overhead.py`` (split-u as real processes through
Mosquitto against centralized training in this process, interleaved pairs, the median ratio),
for torchvision's DenseNet-121 cut at its catalogue defaults (stem and first dense block at the
site, classifier at the site, the rest in the aggregator's trunk), one channel, 224 x 224
synthetic radiographs written as DICOM and read back by the site's DICOM source. The cut-layer
tensor is larger than the small CNN's, but each step's compute grows far more, so the
communication share of a step is small: the ratio shows what a hospital pays for split learning
on a network it would really train. Rows: unpipelined and pipelined (two micro-batches, issue
32), with both processes sharing the machine's cores, and with each on a core of its own (one
thread), as on two machines.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import bench_main, machine
from bench.split_overhead import SITE, breakdown, placement
from edge_agent.data.dicom_source import load_dicom_site
from edge_agent.data.dicom_synth import synthesize_site
from edge_agent.data.settings import DicomData
from medsplit.brokers.mosquitto import Mosquitto
from medsplit.config import OptimizerConfig
from medsplit.precision import MixedPrecision
from medsplit.training import make_optimizer, train_epochs
from models import SplitPlan, cut_shapes

SIZE, BATCH = 224, 16
MODEL = {"name": "torchvision.densenet121", "args": {"in_channels": 1, "image_size": SIZE}}
CLASSES = ["normal", "lesion"]
HEAVY_TARGET = 1.15  # issue 32: where communication is a small share of a step


@dataclass(frozen=True)
class Setup:
    """What one measurement trains, where, and in which precision."""

    model: dict[str, object] = field(default_factory=lambda: dict(MODEL))
    size: int = SIZE
    device: str = "cpu"
    precision: str = "fp32"
    micro_batches: int = 1
    own_cores: bool = False  # the aggregator and the site on a core each (bench.split_overhead)


def _data_section(folder: Path, size: int) -> dict[str, object]:
    return {
        "source": "dicom",
        "folder": str(folder),
        "classes": CLASSES,
        "preprocessing": {"size": size},
    }


def centralized_epoch_seconds(
    x: torch.Tensor, y: torch.Tensor, epochs: int, setup: Setup = Setup()
) -> float:
    """The median of ``epochs`` epochs after a warm-up one, in this process."""
    plan = SplitPlan.model_validate({"model": setup.model})
    device = torch.device(setup.device)
    model = plan.model.build(seed=0).to(device)
    optimizer = make_optimizer(model.parameters(), OptimizerConfig())
    amp = MixedPrecision(setup.precision, device)
    x, y = x.to(device), y.to(device)
    times = []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        train_epochs(
            model, optimizer, x, y, epochs=1, batch_size=BATCH, seed=0, first_epoch=epoch, amp=amp
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def split_epoch(
    workdir: Path, folder: Path, rounds: int, setup: Setup = Setup()
) -> tuple[float, dict[str, float]]:
    """One split-u job (aggregator and agent processes, plaintext Mosquitto): the median
    training phase of its rounds after the first, and the per-step breakdown."""
    workdir.mkdir(parents=True)
    with ExitStack() as stack:
        broker = stack.enter_context(Mosquitto(workdir / "broker"))
        job = {
            "job_id": "bench-heavy",
            "plan": {"model": setup.model},
            "device": setup.device,
            "mode": "split-u",
            "orchestration": "sequential",
            "seed": 0,
            "sites": [SITE],
            "seal_segments": False,  # one site: nobody to seal to
            "rounds": {"count": rounds + 1, "deadline_s": 3600},
            "training": {
                "batch_size": BATCH,
                "precision": setup.precision,
                "micro_batches": setup.micro_batches,
            },
            "broker": {"url": broker.url, "insecure": True},
            "state": {"run_dir": str(workdir / "run")},
        }
        site = {
            "site_id": SITE,
            "job_id": "bench-heavy",
            "broker": {"url": broker.url, "insecure": True},
            "data": _data_section(folder, setup.size),
            "device": setup.device,
            "export_onnx": False,
            "state": {"dir": str(workdir / "state")},
            "waits": {"hello_interval_s": 0.5},
        }
        (workdir / "job.yaml").write_text(yaml.safe_dump(job))
        (workdir / "site.yaml").write_text(yaml.safe_dump(site))
        log = stack.enter_context((workdir / "processes.log").open("w"))
        command = [sys.executable, "-m", "medsplit"]
        processes = [
            subprocess.Popen(
                [*command, role, "--config", str(workdir / f"{name}.yaml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                **placement(setup.own_cores, core),
            )
            for core, (role, name) in enumerate((("aggregator", "job"), ("agent", "site")))
        ]
        if any(p.wait(3600) != 0 for p in processes):
            tail = (workdir / "processes.log").read_text().splitlines()[-15:]
            raise RuntimeError("the split run failed:\n" + "\n".join(tail))
    report = json.loads((workdir / "run" / "report.json").read_text())
    epoch = statistics.median(h["train_seconds"] for h in report["history"][1:])
    return epoch, breakdown(report)


def run(quick: bool) -> str:
    pairs, rounds, images = (1, 1, 48) if quick else (3, 2, 96)
    setups = {
        "unpipelined": Setup(),
        "2 micro-batches": Setup(micro_batches=2),
        "a core each, unpipelined": Setup(own_cores=True),
        "a core each, 2 micro-batches": Setup(micro_batches=2, own_cores=True),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = synthesize_site(Path(tmp) / "dicom", 0, images, size=SIZE)
        data, _ = load_dicom_site(DicomData.model_validate(_data_section(folder, SIZE)))
        x, y = data.x_train, data.y_train
        steps = -(-len(y) // BATCH)
        ratios: dict[str, list[float]] = {name: [] for name in setups}
        splits: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
        centrals = []
        for pair in range(pairs):
            for name, setup in setups.items():
                central = centralized_epoch_seconds(x, y, epochs=1 if quick else 2)
                split, parts = split_epoch(
                    Path(tmp) / f"split-{pair}-{name}", folder, rounds, setup
                )
                centrals.append(central)
                ratios[name].append(split / central)
                splits[name].append(parts)
                print(
                    f"pair {pair + 1}/{pairs}, {name}: centralized {central:.1f} s, split-u "
                    f"{split:.1f} s per epoch ({split / central:.2f}x)",
                    flush=True,
                )
    return _heavy_table(ratios, splits, centrals, images=len(y), steps=steps, pairs=pairs)


def _heavy_table(
    ratios: dict[str, list[float]],
    splits: dict[str, list[dict[str, float]]],
    centrals: list[float],
    *,
    images: int,
    steps: int,
    pairs: int,
) -> str:
    plan = SplitPlan.model_validate({"model": MODEL})
    shapes = cut_shapes(plan, BATCH)
    head_mb = 4 * torch.Size(shapes["head_out"]).numel() / 1e6
    central_ms = 1000 * statistics.median(centrals) / steps
    lines = [
        f"{images} images of 1x{SIZE}x{SIZE}, {steps} steps of {BATCH}; {pairs} interleaved "
        f"pair(s) per row. Centralized: {central_ms:.0f} ms per step.",
        "",
        f"| split-u (fp32, plaintext), DenseNet-121 cut after {plan.cuts[0]} and {plan.cuts[1]} "
        "| vs centralized, median (range) | target | floor | communication share |",
        "|---|---|---|---|---|",
    ]
    names = list(next(iter(splits.values()))[0])
    medians = {}
    for row, row_ratios in ratios.items():
        median = {n: statistics.median(s[n] for s in splits[row]) for n in names}
        medians[row] = median
        total = sum(median.values())
        wire = median["transport"] + median["edge codec"] + median["aggregator codec"]
        # Pipelined, the site's waits overlap the trunk's work: no share is the wire's alone.
        share = f"{100 * wire / total:.0f}%" if median["transport"] >= 0 else "overlapped"
        # The same work unpipelined; on a core each, its core-ms spread over the cores.
        base = medians["a core each, unpipelined" if "core" in row else "unpipelined"]
        cores = 1 / len(os.sched_getaffinity(0)) if "core" in row else 1.0
        floor = (sum(base.values()) - base["transport"]) * cores / central_ms
        met = "met" if statistics.median(row_ratios) <= HEAVY_TARGET else "missed"
        lines.append(
            f"| {row} | {statistics.median(row_ratios):.2f}x "
            f"({min(row_ratios):.2f}-{max(row_ratios):.2f}) | {HEAVY_TARGET:.2f}x, {met} "
            f"| {floor:.2f}x | {share} |"
        )
    lines += [
        "",
        f"| ms per step | {' | '.join(names)} | sum |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for row, median in medians.items():
        cells = " | ".join(f"{median[n]:.0f}" for n in names)
        lines.append(f"| {row} | {cells} | {sum(median.values()):.0f} |")
    lines += [
        "",
        f"Cut-layer activations per step: {head_mb:.1f} MB in fp32 "
        f"({list(shapes['head_out'])}), the same again as their gradient. Floor: the split's "
        "compute and codecs (each on all the cores) against centralized; communication share: "
        "codecs and transport of the step's sum (pipelined, the transport is what is left of "
        "the site's waits once the overlap is taken out, and may go negative).",
    ]
    return "\n".join(lines)


def intro() -> str:
    return (
        "## Split learning overhead on a compute-heavy network: DenseNet-121 at 224 px\n\n"
        "Command: `python bench/split_overhead_heavy.py --write-docs`.\n"
        f"Machine: {machine()}. As the section above, for `torchvision.densenet121` "
        "(catalogue default cuts) on one-channel 224 px synthetic radiographs read from DICOM, "
        "unpipelined and with `training.micro_batches: 2`, sharing the cores and on a core each."
    )


if __name__ == "__main__":
    bench_main("split_overhead_heavy", __doc__, intro, run)
