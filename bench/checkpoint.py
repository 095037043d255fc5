"""What a checkpoint costs: writing and reading back the aggregator's checkpoint per plan.

A checkpoint is written after every round (and every N steps of sequential split rounds), so
its cost adds to every round. For each built-in plan the benchmark builds the aggregator's
state as it is mid-job (global tensors, a trunk with Adam moments, a few rounds of history),
then times, interleaved, ``CheckpointStore.save`` (safetensors + JSON + SHA-256, temp file,
fsync, rename, fsync of the directory) against the baseline of ``safetensors.torch.save_file``
of the same tensors (no digest, no fsync), against the first version of the checkpoint writer
(the whole file encoded in memory, then written), and ``newest`` (read back, verify, decode).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _report import bench_main, machine
from safetensors.torch import save_file

from aggregator.checkpoint import CheckpointStore
from aggregator.config import JobConfig
from aggregator.state import ResumePoint, RoundRecord, SiteEntry
from aggregator.trunk import Trunk
from medsplit.config import OptimizerConfig
from medsplit.protocol import exchanged_keys
from medsplit.snapshots import encode
from medsplit.storage import atomic_write
from models import split_model

PLANS = {"mlp-ehr-u": "split-u", "cnn-cxr-u": "split-u", "resnet18-cxr": "split-u"}


def _state(plan_name: str) -> tuple[JobConfig, ResumePoint, Trunk]:
    mode = PLANS[plan_name]
    data = {"job_id": "bench", "plan": plan_name, "mode": mode, "sites": ["a", "b"]}
    config: JobConfig = JobConfig.from_mapping(data)
    model = config.plan.model.build(seed=0)
    trunk = Trunk(split_model(model, config.plan).trunk, OptimizerConfig(), torch.device("cpu"))
    for parameter in trunk.module.parameters():  # Adam moments exist after the first step
        parameter.grad = torch.randn_like(parameter)
    trunk.optimizer.step()
    keys = exchanged_keys(config.plan, config.mode)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}
    record = RoundRecord(0, metrics={"a": {"accuracy": 0.9}}, trained=["a", "b"])
    sites = {s: SiteEntry(s, joined=True) for s in ("a", "b")}
    point = ResumePoint(3, weights, (record,) * 3, None, sites)
    return config, point, trunk


def _seconds(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _measure(plan: str, repeats: int) -> str:
    config, point, trunk = _state(plan)
    with tempfile.TemporaryDirectory() as tmp:
        store = CheckpointStore(Path(tmp) / "ckpt", keep=2)
        tensors, _ = trunk.state()
        tensors |= {f"weights/{k}": v for k, v in point.weights.items()}
        plain = Path(tmp) / "plain.safetensors"
        in_memory = Path(tmp) / "in-memory.safetensors"
        base, before, ours, back = [], [], [], []
        for _ in range(repeats):  # interleaved: all see the same machine state
            base.append(_seconds(lambda: save_file(tensors, str(plain))))
            before.append(_seconds(lambda: atomic_write(in_memory, encode(tensors, {}))))
            ours.append(_seconds(lambda: store.save(point, config, trunk.state())))
            back.append(_seconds(lambda: store.newest(config)))
        size = store.paths()[0].stat().st_size / 1e6
    b, m, o, r = (statistics.median(x) * 1000 for x in (base, before, ours, back))
    return (
        f"| {plan} | {size:.1f} | {b:.1f} ms | {m:.1f} ms | {o:.1f} ms | {o / b:.1f}x | "
        f"{r:.1f} ms |"
    )


def run(quick: bool) -> str:
    repeats = 3 if quick else 9
    rows = [
        "| plan | checkpoint MB | save_file (baseline) | encoded in memory, then written | "
        "checkpoint save | ratio to baseline | read back |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows += [_measure(plan, repeats) for plan in PLANS]
    return "\n".join(rows)


def intro() -> str:
    return (
        "## Checkpoints: what saving the job after a round costs\n\n"
        "`python bench/checkpoint.py --write-docs` (medians of interleaved runs; the baseline is "
        "`safetensors.torch.save_file` of the same tensors, without digest or fsync).\n"
        f"Machine: {machine()}."
    )


if __name__ == "__main__":
    bench_main("checkpoint", __doc__, intro, run)
