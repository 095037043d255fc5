"""``medsplit experiment`` over vertical partitions: what joining the parties' columns buys.

The built-in table's columns are divided between two or three parties (``builtin-vertical``),
or synthetic-cxr's radiographs held by an imaging centre and a clinical table of the same
patients by the hospital; each party holds a seeded share of the patients and the label party
(the hospital) the diagnosis. Compared on
the same held-out patients (the common ones every party holds out, from the job seed):

* ``vertical (top at the label party)`` and ``vertical (top at the aggregator)``: real jobs
  through a real broker, the parties aligned by PSI;
* ``centralized (joined table)``: the same network trained in one place on the joined table --
  the distributed jobs' exact baseline (its row says whether the U-shaped job ended with the
  very same weights);
* ``alone: PARTY``: the same network trained the same way on that party's columns only (every
  other party's columns blanked to zeros -- their mean, once standardised -- so their heads
  give constants), with the labels: what each party's columns are worth without the others'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from aggregator.config import JobConfig
from aggregator.report import report_dict, write_report
from edge_agent.data.site_data import SiteData
from edge_agent.data.synthetic import CXR_FINDINGS
from edge_agent.data.vertical import PartyTable
from experiments.inprocess import JobResult, run_job
from experiments.results import Spread
from experiments.runner import CELL_FAILURES, connector_for, run_grid
from experiments.vertical import (
    builtin_heads,
    builtin_tables,
    centralized,
    joined,
    only,
    party_names,
    vertical_plan,
)
from medsplit.config import BrokerConfig, OptimizerConfig
from medsplit.ids import ID_PATTERN
from medsplit.storage import atomic_write
from medsplit.training import evaluate_model
from models import ConfigError
from models.config_errors import load_yaml_mapping, validate
from models.vertical import Merge

TOPS = {True: "top at the label party", False: "top at the aggregator"}


class VerticalExperiment(BaseModel):
    """A grid of party counts x seeds over vertical partitions of a built-in table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=ID_PATTERN)
    vertical: bool = Field(True, description="marks the file as a vertical experiment")
    dataset: Literal["breast-cancer", "synthetic-cxr"] = Field(
        "breast-cancer", description="columns in blocks, or (synthetic-cxr) a table and images"
    )
    parties: list[int] = Field(default_factory=lambda: [2, 3], min_length=1)
    coverage: float = Field(0.9, gt=0, le=1, description="the share of patients each holds")
    merge: Merge = "concat"
    hidden: int = Field(8, ge=1, le=4096, description="each head's and the top's width")
    channels: list[int] = Field(
        default_factory=lambda: [8, 16],
        min_length=1,
        description="the imaging party's CNN head: channels of its conv blocks (synthetic-cxr)",
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    rounds: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=65_536)
    optimizer: OptimizerConfig = OptimizerConfig()
    broker: BrokerConfig | None = None
    out: Path | None = None
    timeout_s: float = Field(3600.0, gt=0)

    @model_validator(mode="after")
    def _image_partition_has_two_parties(self) -> VerticalExperiment:
        if self.dataset == "synthetic-cxr" and self.parties != [2]:
            raise ValueError(
                "parties: synthetic-cxr is held by 2 parties (a clinical table and the images); "
                f"set parties: [2], not {self.parties}"
            )
        return self

    @property
    def output_dir(self) -> Path:
        return self.out or Path("runs") / "experiments" / self.name

    def heads(self, parties: int) -> dict[str, dict[str, Any]]:
        """Each party's head, in party order (the first holds the labels)."""
        names = party_names(parties)
        return builtin_heads(self.dataset, names, hidden=self.hidden, channels=self.channels)

    def tables(self, parties: int, seed: int) -> dict[str, PartyTable]:
        """Each party's records for the cell (the first holds the labels)."""
        names = party_names(parties)
        return builtin_tables(names, dataset=self.dataset, coverage=self.coverage, seed=seed)

    def job(
        self,
        parties: int,
        seed: int,
        u_shaped: bool,
        broker_url: str,
        *,
        gradient_noise: float | None = 0.0,
    ) -> JobConfig:
        """The cell's job; ``gradient_noise`` None: the job's default label defense (noise on
        the gradient the label party returns), 0: none -- the baselines' exact counterpart."""
        names = party_names(parties)
        top = "u" if u_shaped else "agg"
        noise = "" if gradient_noise == 0 else "-noise"
        job_id = f"{self.name}-{top}-{parties}p-{seed}{noise}"
        data = {
            "job_id": job_id,
            "mode": "vertical",
            "plan": vertical_plan(
                self.heads(parties), merge=self.merge, u_shaped=u_shaped, hidden=self.hidden
            ),
            "sites": names,
            "seed": seed,
            "dataset": self.dataset,
            "rounds": {"count": self.rounds, "deadline_s": self.timeout_s},
            "training": {"batch_size": self.batch_size, "optimizer": self.optimizer.model_dump()},
            "defenses": {} if gradient_noise is None else {"gradient_noise": gradient_noise},
            "broker": {"url": broker_url, "insecure": True},
            "state": {"run_dir": str(self.output_dir / "runs" / job_id)},
        }
        config: JobConfig = JobConfig.from_mapping(data, f"<experiment {self.name}>")
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> VerticalExperiment:
        config: VerticalExperiment = validate(cls, load_yaml_mapping(path), str(path))
        return config


@dataclass
class VerticalResult:
    """One party count and seed: every method's held-out accuracy and AUROC."""

    parties: int
    seed: int
    status: str = "completed"
    error: str = ""
    metrics: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    exact: bool | None = None  # the U-shaped job ended with the centralized weights
    seconds: float = 0.0


@dataclass(frozen=True)
class VerticalCell:
    parties: int
    seed: int

    def label(self) -> str:
        return f"vertical, {self.parties} parties, seed {self.seed}"


def run_vertical_experiment(config: VerticalExperiment) -> list[VerticalResult]:
    cells = [VerticalCell(parties, seed) for parties in config.parties for seed in config.seeds]

    def run(cell: VerticalCell, url: str, protocol: str) -> VerticalResult:
        return _run_cell(config, cell, url)

    return run_grid(config, cells, run)


def _run_cell(config: VerticalExperiment, cell: VerticalCell, url: str) -> VerticalResult:
    result = VerticalResult(cell.parties, cell.seed)
    started = time.monotonic()
    names = party_names(cell.parties)
    try:
        for u_shaped in (True, False):
            job = config.job(cell.parties, cell.seed, u_shaped, url)
            tables = config.tables(cell.parties, cell.seed)
            begun = time.monotonic()
            outcome = run_job(job, tables, connector_for(job), timeout=config.timeout_s)
            _report(job, outcome, time.monotonic() - begun)
            last = outcome.history[-1].metrics[names[0]]
            result.metrics[f"vertical ({TOPS[u_shaped]})"] = (last["accuracy"], last["auroc"])
            if u_shaped:
                data = {party: agent.data for party, agent in outcome.agents.items()}
                got = dict(outcome.coordinator.final_state())
                for agent in outcome.agents.values():
                    got |= agent.segments.state() if agent.segments is not None else {}
                result.exact = _baselines(job, data, names, got, result)
    except CELL_FAILURES as exc:
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
    result.seconds = time.monotonic() - started
    return result


def _report(job: JobConfig, outcome: JobResult, seconds: float) -> None:
    """The job's report.json, as a deployed aggregator writes it."""
    traffic = {
        site: {"up": entry.bytes_up, "down": entry.bytes_down}
        for site, entry in outcome.coordinator.sites.items()
    }
    report = report_dict(
        job, outcome.history, traffic, seconds, late_messages=outcome.coordinator.late_messages
    )
    write_report(job.output_dir, report)


def _baselines(
    job: JobConfig,
    data: dict[str, SiteData],
    names: list[str],
    distributed: dict[str, torch.Tensor],
    result: VerticalResult,
) -> bool:
    """The joined table in one place, and each party's columns alone (with the labels);
    whether the distributed job ended with the joined model's very weights."""
    table = joined(data, names)
    expected = centralized(job, table)
    result.metrics["centralized (joined table)"] = _scored(job, expected, table)
    for party in names:
        own = joined(only(data, party), names)
        result.metrics[f"alone: {party}'s columns"] = _scored(job, centralized(job, own), own)
    same_keys = distributed.keys() == expected.keys()
    return same_keys and all(torch.equal(distributed[k], expected[k]) for k in expected)


def _scored(job: JobConfig, state: dict[str, torch.Tensor], data: SiteData) -> tuple[Any, Any]:
    model = job.plan.model.build(seed=job.seed)
    model.load_state_dict(state)
    metrics = evaluate_model(model, data.x_test, data.y_test, job.training.threshold).as_meta()
    return metrics["accuracy"], metrics["auroc"]


def markdown(config: VerticalExperiment, results: list[VerticalResult], command: str) -> str:
    lines = [
        f"```bash\n{command}\n```",
        "",
        f"Built-in `{config.dataset}`, {_partition_text(config)}, each party holding "
        f"{config.coverage:.0%} of the patients (seeded); {config.rounds} rounds, batch "
        f"{config.batch_size}, {config.optimizer.name} lr {config.optimizer.lr:g}, merge "
        f"`{config.merge}`, width {config.hidden}, seeds {config.seeds}. Held-out accuracy and "
        "AUROC on the same common patients, mean ± std over seeds.",
        "",
    ]
    for parties in config.parties:
        members = [r for r in results if r.parties == parties and r.status == "completed"]
        methods = sorted(  # the jobs, then their exact baseline, then each party alone
            dict.fromkeys(m for r in members for m in r.metrics),
            key=lambda m: 2 if m.startswith("alone") else m.startswith("centralized"),
        )
        exact = sum(1 for r in members if r.exact)
        lines += [
            f"### {parties} parties ({', '.join(party_names(parties))}; the first holds the labels)",
            "",
            "| method | accuracy | AUROC | runs |",
            "|---|---|---|---|",
        ]
        for method in methods:
            values = [r.metrics[method] for r in members if method in r.metrics]
            accuracy = Spread.of([v[0] for v in values])
            auroc = Spread.of([v[1] for v in values])
            lines.append(f"| {method} | {accuracy.text()} | {auroc.text()} | {len(values)} |")
        lines += [
            "",
            f"The U-shaped job ended with exactly the centralized weights in {exact} of "
            f"{len(members)} runs.",
            "",
        ]
    return "\n".join(lines)


def _partition_text(config: VerticalExperiment) -> str:
    if config.dataset == "synthetic-cxr":
        return (
            f"the radiographs at the imaging centre (a CNN head, channels {config.channels}) "
            "and a clinical table of the same patients at the hospital "
            f"({', '.join(name for name, *_ in CXR_FINDINGS)})"
        )
    return "its columns divided between the parties in contiguous blocks"


def write_vertical_results(
    config: VerticalExperiment, results: list[VerticalResult], command: str
) -> Path:
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.md"
    text = f"# Experiment {config.name}\n\n" + markdown(config, results, command)
    atomic_write(path, text.encode())
    return path


def is_vertical(path: str | Path) -> bool:
    """Whether an experiment file describes a vertical experiment (``vertical: true``)."""
    try:
        return bool(load_yaml_mapping(path).get("vertical"))
    except ConfigError:
        return False
