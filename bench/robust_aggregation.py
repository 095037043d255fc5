"""What one hostile site does to the honest sites' accuracy under each aggregation.

    python bench/robust_aggregation.py [--write-docs] [--quick]

Three sites train one model with FedAvg (and FLOP on breast-cancer); the third sends, at every
round, a well-formed update that is one of:

* ``scaled``: every weight multiplied by -50 (the attack that ruined a plain-mean job);
* ``negated``: its update reversed and boosted, ``w - 10 * (trained - w)``;
* ``noise``: Gaussian weights of standard deviation 10.

Each cell is the mean over seeds of the honest sites' accuracy on their own test sets after the
last round (pooled over their test records), for the plain sample-weighted mean (FedAvg's),
the weighted mean of updates clipped to the round's median update norm, the same clipping then
the coordinate-wise trimmed mean (with three sites, the median), and the default: the same
clipping, then the geometric median (RFA). The "clean" column is the same job with three honest sites; the others are
the change from the same aggregation's clean run, in points. Jobs run in this process over the
in-memory broker (the aggregation is the same code whatever the transport).
"""

from __future__ import annotations

import statistics
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from aggregator.config import JobConfig
from aggregator.coordinator import JobFailed
from bench._report import bench_main, machine
from edge_agent.agent import Agent
from edge_agent.data import datasets
from experiments.inprocess import run_job
from medsplit.protocol import Kind
from medsplit.transport import MemoryBroker
from medsplit.wire import Envelope
from medsplit.wiring import memory_connector

SITES = ["site-a", "site-b", "site-c"]
HOSTILE = "site-c"
ATTACKS = ("scaled", "negated", "noise")
PLAIN, DEFAULT = "plain mean", "default: median-norm clip + geometric median"
AGGREGATIONS: dict[str, dict[str, Any]] = {
    PLAIN: {"method": "mean", "median_norm_clip": None},
    "median-norm clip + mean": {"method": "mean"},
    "median-norm clip + trimmed mean": {"method": "trimmed-mean"},
    DEFAULT: {},
}


def poisoned(
    attack: str, received: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The update a hostile site sends instead of ``trained`` (it received ``received``)."""
    out = {}
    noise = torch.Generator().manual_seed(7)
    for key, value in trained.items():
        if not value.is_floating_point():
            out[key] = value
        elif attack == "scaled":
            out[key] = value * -50
        elif attack == "negated":
            out[key] = received[key] - 10 * (value - received[key])
        else:
            out[key] = torch.randn(value.shape, generator=noise) * 10
    return out


class HostileAgent(Agent):
    """Site c replaces its trained weights by ``attack`` at every round."""

    attack: ClassVar[str] = "scaled"
    received: dict[str, torch.Tensor]

    def _train(self, env: Envelope) -> None:
        self.received = dict(env.tensors)
        super()._train(env)

    def _publish(
        self, envelope: Envelope, cast: set[str] | None = None, *, wait: bool = True
    ) -> None:
        if self.site_id == HOSTILE and envelope.kind == Kind.DONE:
            tensors = poisoned(self.attack, self.received, envelope.tensors)
            envelope = replace(envelope, tensors=tensors)
        super()._publish(envelope, cast, wait=wait)


@dataclass(frozen=True)
class Setting:
    """One group of rows: a dataset and plan, a mode, a partition, seeds and rounds."""

    dataset: str
    plan: str
    mode: str
    partition: str
    seeds: tuple[int, ...]
    rounds: int
    local_epochs: int = 1
    aggregations: tuple[str, ...] = tuple(AGGREGATIONS)


def honest_accuracy(
    setting: Setting, seed: int, aggregation: dict[str, Any], attack: str | None
) -> float | None:
    """The honest sites' final accuracy, pooled over their test records; None when the job
    failed."""
    config = JobConfig.from_mapping(
        {
            "job_id": f"robust-{uuid.uuid4().hex[:8]}",
            "plan": setting.plan,
            "mode": setting.mode,
            "rounds": {"count": setting.rounds, "deadline_s": 600, "join_deadline_s": 60},
            "training": {
                "batch_size": 32,
                "local_epochs": setting.local_epochs,
                "optimizer": {"name": "adam", "lr": 0.001},
            },
            "seed": seed,
            "sites": SITES,
            "aggregation": aggregation,
        }
    )
    dataset = datasets.load(setting.dataset)
    shares = datasets.all_sites(dataset, len(SITES), setting.partition, seed=seed)
    agent_type: type[Agent] = Agent
    if attack is not None:
        agent_type = type(f"Hostile{attack}", (HostileAgent,), {"attack": attack})
    try:
        result = run_job(
            config,
            dict(zip(SITES, shares, strict=True)),
            memory_connector(MemoryBroker()),
            agent_type=agent_type,
            timeout=1800,
        )
    except JobFailed:  # e.g. every site's model went non-finite and was refused
        return None
    final = [result.history[-1].metrics[site] for site in SITES if site != HOSTILE]
    # Pooled over the honest sites' test records: a skewed partition can leave a site with a
    # handful of them, whose accuracy alone would swing by tens of points per record.
    correct = sum(float(m["accuracy"] or 0.0) * int(m["samples"]) for m in final)
    return correct / sum(int(m["samples"]) for m in final)


def settings(quick: bool) -> list[Setting]:
    seeds = (0,) if quick else (0, 1, 2)
    tabular = [
        Setting("breast-cancer", "mlp-ehr", mode, partition, seeds, 5 if quick else 20)
        for mode in ("fedavg", "flop")
        for partition in ("iid", "dirichlet:0.5")
    ]
    images = [  # 3 local epochs: with 1, ten rounds leave the CNN near chance
        Setting(
            "synthetic-cxr",
            "cnn-cxr",
            "fedavg",
            partition,
            (0,) if quick else (0, 1),
            2 if quick else 10,
            local_epochs=3,
            aggregations=(PLAIN, DEFAULT),
        )
        for partition in ("iid", "dirichlet:0.5")
    ]
    return tabular + images


def accuracy(setting: Setting, aggregation: dict[str, Any], attack: str | None) -> float | None:
    """The honest sites' final accuracy, mean over the setting's seeds; None if a job failed."""
    results = [honest_accuracy(setting, seed, aggregation, attack) for seed in setting.seeds]
    finished = [r for r in results if r is not None]
    return statistics.mean(finished) if len(finished) == len(results) else None


def change(value: float | None, baseline: float | None) -> str:
    """A cell: the change in points, or why there is none."""
    if value is None:
        return "job failed"
    return "-" if baseline is None else f"{100 * (value - baseline):+.1f}"


def run(quick: bool) -> str:
    lines = [
        "| data | mode | partition | aggregation | clean | scaled | negated | noise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting in settings(quick):
        plain_clean: float | None = None
        for name in setting.aggregations:
            aggregation = AGGREGATIONS[name]
            clean = accuracy(setting, aggregation, None)
            if name == PLAIN:
                plain_clean = clean
                versus = ""
            else:
                versus = f" ({change(clean, plain_clean)})"
            cells = [change(accuracy(setting, aggregation, attack), clean) for attack in ATTACKS]
            shown = "job failed" if clean is None else f"{100 * clean:.1f}"
            row = (
                f"| {setting.dataset} | {setting.mode} | {setting.partition} | {name} | "
                f"{shown}{versus} | {' | '.join(cells)} |"
            )
            print(row, flush=True)
            lines.append(row)
    return "\n".join(lines)


def intro() -> str:
    return (
        "## Robust aggregation: one hostile site among three\n\n"
        "Command: `python bench/robust_aggregation.py --write-docs`.\n"
        f"Machine: {machine()}. Three sites, site-c hostile at every round; the honest sites' "
        "final accuracy (%, pooled over their test records), mean over seeds (3 on "
        "breast-cancer, 20 rounds of 1 local epoch; 2 on synthetic-cxr, 10 rounds of 3 local "
        "epochs), Adam lr 0.001, batch 32. `clean`: no hostile site (in "
        "brackets: the change from the plain mean's clean run); the attack columns: the change "
        "in points from the same aggregation's clean run. `scaled`: every weight x -50; "
        "`negated`: `w - 10 (trained - w)`; `noise`: N(0, 10^2) weights."
    )


if __name__ == "__main__":
    bench_main("robust_aggregation", __doc__, intro, run)
