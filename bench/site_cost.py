"""What one hospital computes, holds and sends in each mode: the source paper's efficiency claim.

    python bench/site_cost.py [--write-docs] [--quick]

Three sites on each built-in dataset train two rounds (one local epoch each) in every mode, in
this process over the in-memory broker, with the job defaults (sealed segments, split-u's label
noise). Per site and round, averaged over the sites:

* **GFLOP**: forward and backward of the layers the site runs, over its training records once
  (one epoch), counted by ``torch.utils.flop_counter`` on the site's own segments (split: the
  head; split-u: head and tail; federated and centralized: the whole model);
* **compute s**: the site's own training time in the run (a split site's time waiting on the
  trunk and the wire excluded);
* **memory MB**: the site's parameters, their Adam moments and gradients, and the activations
  of one batch through its layers (forward hooks), in float32;
* **MB up / MB down**: what the site sent and received in a round, as it counted them.

Centralized is one party holding every record: its row is the whole computation in one place.
The ratio column compares each mode's FLOPs per site with centralized training's per record
share (centralized FLOPs / 3): what a hospital computes relative to its share of the work.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from aggregator.config import JobConfig
from bench._report import bench_main, machine
from edge_agent.data import datasets
from experiments.inprocess import run_job
from experiments.table_plans import BUILTIN
from medsplit.modes import MODES, Mode
from medsplit.transport import MemoryBroker
from medsplit.wiring import memory_connector
from models import split_model
from tests.support.configs import job_config

SITES = ["site-a", "site-b", "site-c"]
MODES_RUN = ("split", "split-u", "flop", "fedavg")
BATCH = 32


def _plan(dataset: str, mode: str) -> str:
    plans = BUILTIN[dataset]
    return (
        plans["split-u"]
        if mode == "split-u"
        else plans["split" if mode == "split" else "federated"]
    )


def _config(dataset: str, mode: str, rounds: int) -> JobConfig:
    return job_config(
        {
            "job_id": f"cost-{uuid.uuid4().hex[:6]}",
            "plan": _plan(dataset, mode),
            "mode": mode,
            "rounds": rounds,
            "batch_size": BATCH,
            "sites": SITES,
            "dataset": dataset,
            "round_deadline_s": 900,
            "join_deadline_s": 120,
        }
    )


def epoch_gflop(config: JobConfig, mode: str, x: torch.Tensor) -> float:
    """Forward and backward FLOPs of the site's layers over ``x`` once (one epoch), in GFLOP.
    A U-shaped site's head and tail see different inputs: each is counted on its own."""
    model = config.plan.model.build(seed=0)
    counter = FlopCounterMode(display=False)
    if mode in ("split", "split-u"):
        parts = split_model(model, config.plan)
        with counter:
            h = parts.head(x)
            h.sum().backward()
            if parts.tail is not None:
                t = parts.trunk(h.detach()).detach().requires_grad_()
                parts.tail(t).sum().backward()
        trunk_only = FlopCounterMode(display=False)
        if parts.tail is not None:  # the trunk's forward above is the aggregator's work
            with trunk_only:
                parts.trunk(h.detach())
        return (counter.get_total_flops() - trunk_only.get_total_flops()) / 1e9
    with counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 1e9


def memory_mb(config: JobConfig, mode: str, x: torch.Tensor) -> float:
    """The site's parameters with their gradients and Adam's two moments, plus one batch's
    activations through its layers (forward hooks), in float32 MB."""
    model = config.plan.model.build(seed=0)
    sizes: list[int] = []

    def count(_module: nn.Module, _inputs: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel())

    batch = x[:BATCH]
    if mode in ("split", "split-u"):
        parts = split_model(model, config.plan)
        layers: list[nn.Module] = [parts.head] + ([parts.tail] if parts.tail is not None else [])
        with torch.no_grad():
            trunk_out = parts.trunk(parts.head(batch))
        inputs = [batch, trunk_out]
    else:
        layers, inputs = [model], [batch]
    hooks = [
        module.register_forward_hook(count)
        for layer in layers
        for module in layer.modules()
        if not list(module.children())
    ]
    try:
        with torch.no_grad():
            for layer, given in zip(layers, inputs, strict=False):
                layer(given)
    finally:
        for hook in hooks:
            hook.remove()
    params = sum(p.numel() for layer in layers for p in layer.parameters())
    return 4 * (4 * params + sum(sizes)) / 1e6


def measure(dataset: str, quick: bool) -> list[dict[str, Any]]:
    rounds = 1 if quick else 2
    data = datasets.load(dataset)
    shares = datasets.all_sites(data, len(SITES), "iid", seed=0)
    sites = dict(zip(SITES, shares, strict=True))
    rows = []
    for mode in MODES_RUN:
        config = _config(dataset, mode, rounds)
        result = run_job(config, sites, memory_connector(MemoryBroker()), timeout=1800)
        x = shares[0].x_train
        gflop = statistics.mean(epoch_gflop(config, mode, s.x_train) for s in shares)
        compute = [
            (r.site_timings.get(s, {}).get("compute") or r.compute_seconds.get(s, 0.0))
            for r in result.history
            for s in SITES
        ]
        up = [r.bytes[s]["up"] for r in result.history for s in SITES if s in r.bytes]
        down = [r.bytes[s]["down"] for r in result.history for s in SITES if s in r.bytes]
        rows.append(
            {
                "mode": f"{mode} ({'sequential' if MODES[Mode(mode)].cut_layer else 'parallel'})",
                "gflop": gflop,
                "seconds": statistics.mean(compute),
                "memory": memory_mb(config, mode, x),
                "up": statistics.mean(up) / 1e6,
                "down": statistics.mean(down) / 1e6,
                "accuracy": result.history[-1].mean()["accuracy"],
            }
        )
    rows.append(_centralized(dataset, data, quick))
    return rows


def _centralized(dataset: str, data: datasets.Dataset, quick: bool) -> dict[str, Any]:
    from experiments.baselines import run_centralized  # noqa: PLC0415

    config = _config(dataset, "fedavg", 1 if quick else 2)
    shares = datasets.all_sites(data, len(SITES), "iid", seed=0)
    x = torch.cat([s.x_train for s in shares])
    started = time.perf_counter()
    history = run_centralized(config, dict(zip(SITES, shares, strict=True)))
    seconds = (time.perf_counter() - started) / config.rounds.count
    accuracy = history[-1].mean()["accuracy"]
    return {
        "mode": "centralized (all records in one place)",
        "gflop": epoch_gflop(config, "centralized", x),
        "seconds": seconds,
        "memory": memory_mb(config, "centralized", x),
        "up": 0.0,
        "down": 0.0,
        "accuracy": accuracy,
    }


def table(quick: bool) -> str:
    lines = []
    for dataset in ("breast-cancer", "synthetic-cxr"):
        rows = measure(dataset, quick)
        central = rows[-1]["gflop"] / len(SITES)
        lines += [
            f"**{dataset}** ({len(SITES)} sites, IID, one local epoch per round; per site and "
            "round, mean over sites)",
            "",
            "| mode | GFLOP | vs its share of centralized | compute s | memory MB | MB up | "
            "MB down | accuracy |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in rows:
            ratio = row["gflop"] / central if not row["mode"].startswith("central") else 3.0
            lines.append(
                f"| {row['mode']} | {row['gflop']:.4g} | {ratio:.2f}x | {row['seconds']:.3g} | "
                f"{row['memory']:.3g} | {row['up']:.3g} | {row['down']:.3g} | "
                f"{row['accuracy']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def intro() -> str:
    return (
        "## What a site computes and sends, by mode\n\n"
        "`python bench/site_cost.py --write-docs` on "
        f"{machine()}. FLOPs from `torch.utils.flop_counter` on the layers the site runs; "
        "compute seconds measured in the same run (a split site's waits on the trunk and the "
        "wire excluded); memory is parameters, gradients and Adam's moments plus one batch's "
        "activations (float32); MB up/down per round as the sites counted them."
    )


if __name__ == "__main__":
    bench_main("site-cost", __doc__, intro, table)
