"""Time per epoch of U-shaped split learning through Mosquitto against centralized training.

    python bench/split_overhead.py [--write-docs] [--quick]

Same ``cnn`` on the same 64x64 synthetic-cxr images (one site holding all of them), batch 32,
same seed. Centralized training runs here; split-u runs as the real processes (``medsplit
aggregator`` and one ``medsplit agent``) through a Mosquitto started here, once with fp32 and
once with fp16 on the wire. The epoch time of split-u is the aggregator's training phase of a
round (after a warm-up round); the ratio is against the centralized epoch measured in this run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import bench_main, machine
from edge_agent.data import datasets
from medsplit.brokers.mosquitto import Mosquitto
from medsplit.config import OptimizerConfig
from medsplit.training import train_centralized
from models import cut_shapes, load_plan

PLAN = "cnn-cxr-u"
BATCH = 32


def centralized_epoch_seconds(data: datasets.SiteData, epochs: int) -> float:
    plan = load_plan(PLAN)
    torch.manual_seed(0)
    model = plan.model.build()
    times = []
    for epoch in range(epochs + 1):  # the first epoch warms up
        start = time.perf_counter()
        train_centralized(
            model,
            data.x_train,
            data.y_train,
            epochs=1,
            batch_size=BATCH,
            optimizer=OptimizerConfig(),
            seed=0,
            first_epoch=epoch,
        )
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def split_epoch_seconds(
    broker_url: str, workdir: Path, wire_dtype: str, rounds: int, omp_wait: str = "PASSIVE"
) -> float:
    job_id = f"bench-{wire_dtype}-{omp_wait.lower()}"
    job = {
        "job_id": job_id,
        "plan": PLAN,
        "mode": "split-u",
        "orchestration": "sequential",
        "seed": 0,
        "sites": ["site-1"],
        "dataset": "synthetic-cxr",
        "rounds": {"count": rounds + 1},
        "training": {"batch_size": BATCH, "wire_dtype": wire_dtype},
        "broker": {"url": broker_url, "insecure": True},
        "state": {"run_dir": str(workdir / job_id)},
    }
    site = {
        "site_id": "site-1",
        "job_id": job_id,
        "broker": {"url": broker_url, "insecure": True},
        "data": {
            "dataset": "synthetic-cxr",
            "partition": "iid",
            "num_sites": 1,
            "index": 0,
            "seed": 0,
        },
        "device": "cpu",
        "state": {"dir": str(workdir / f"{job_id}-state")},
        "waits": {"hello_interval_s": 0.5},
    }
    (workdir / f"{job_id}.yaml").write_text(yaml.safe_dump(job))
    (workdir / f"{job_id}-site.yaml").write_text(yaml.safe_dump(site))
    command = [sys.executable, "-m", "medsplit"]
    env = {**os.environ, "OMP_WAIT_POLICY": omp_wait}
    with (workdir / f"{job_id}.log").open("w") as log:
        aggregator = subprocess.Popen(
            [*command, "aggregator", "--config", str(workdir / f"{job_id}.yaml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        agent = subprocess.Popen(
            [*command, "agent", "--config", str(workdir / f"{job_id}-site.yaml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        if aggregator.wait(1800) != 0 or agent.wait(120) != 0:
            raise RuntimeError(f"split run failed; see {workdir / f'{job_id}.log'}")
    report = json.loads((workdir / job_id / "report.json").read_text())
    return statistics.median(h["train_seconds"] for h in report["history"][1:])


def run(quick: bool) -> str:
    rounds = 1 if quick else 3
    data = datasets.share("synthetic-cxr", "iid", 1, 0, seed=0)
    steps = -(-data.train_samples // BATCH)
    central = centralized_epoch_seconds(data, rounds)
    print(
        f"centralized: {central:.2f} s per epoch ({1000 * central / steps:.1f} ms per step)",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp)) as broker:
        runs = (("float32", "ACTIVE"), ("float32", "PASSIVE"), ("float16", "PASSIVE"))
        for wire_dtype, omp_wait in runs:
            split = split_epoch_seconds(broker.url, Path(tmp), wire_dtype, rounds, omp_wait)
            label = f"{wire_dtype} wire"
            if omp_wait == "ACTIVE":
                label += ", OpenMP threads spinning (torch's default)"
            rows.append((label, split))
            print(f"split-u {label}: {split:.2f} s per epoch, {split / central:.2f}x", flush=True)
    head_mb = 4 * torch.Size(cut_shapes(load_plan(PLAN), BATCH)["head_out"]).numel() / 1e6
    lines = [
        f"| {data.train_samples} images, {steps} steps of {BATCH} | seconds per epoch | ms per step | vs centralized |",
        "|---|---|---|---|",
        f"| centralized | {central:.2f} | {1000 * central / steps:.1f} | 1.00x |",
    ]
    for label, split in rows:
        lines.append(
            f"| split-u, {label} | {split:.2f} | {1000 * split / steps:.1f} | {split / central:.2f}x |"
        )
    lines.append("")
    lines.append(
        f"Cut-layer activations per step: {head_mb:.1f} MB in fp32 (up), the same again as their gradient (down)."
    )
    return "\n".join(lines)


def intro() -> str:
    return (
        "## Split learning overhead: split-u through Mosquitto vs centralized\n\n"
        "Command: `make bench` (runs `python bench/split_overhead.py --write-docs` after the transport benchmark).\n"
        f"Machine: {machine()}. The aggregator and the agent are separate processes "
        "(`medsplit aggregator`, `medsplit agent`) talking through Mosquitto on loopback; plan "
        "`cnn-cxr-u` (head: first conv block, tail: classifier), one site with all images."
    )


if __name__ == "__main__":
    bench_main("split_overhead", __doc__, intro, run)
