"""The experiment file: which modes, partitions, site counts and seeds to compare, and how.

Every cell of the grid becomes one ``JobConfig`` -- the same validated config the aggregator
reads -- before anything runs, so a typo fails in a second, not after an hour of training.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aggregator.config import JobConfig
from edge_agent.data.names import check_name, parse_scheme
from experiments.table_plans import dataset_plan, plan_family
from medsplit.config import BrokerConfig, DefenseSettings, OptimizerConfig
from medsplit.ids import ID_PATTERN
from medsplit.modes import MODES, SPLIT_MODES, Mode, Orchestration, WireDtype
from models import ConfigError
from models.config_errors import load_yaml_mapping, validate

ExperimentMode = Literal["centralized", "local", "fedavg", "flop", "split", "split-u"]
ALL_MODES: tuple[ExperimentMode, ...] = (
    "centralized",
    "local",
    "fedavg",
    "flop",
    "split",
    "split-u",
)
BASELINES = ("centralized", "local")


class Plans(BaseModel):
    """Which plan each family of modes uses; all must describe the same model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    federated: str | None = Field(None, description="centralized, local, fedavg, flop")
    split: str | None = Field(None, description="vanilla split (no tail)")
    split_u: str | None = Field(None, alias="split-u", description="U-shaped split (a tail)")


class PrivacySettings(BaseModel):
    """What ``medsplit privacy`` attacks, and with which defenses (docs/privacy.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    auxiliary_fraction: float = Field(
        0.2,
        gt=0,
        le=0.5,
        description="share of the dataset held out from every site as the attacker's public "
        "auxiliary data (stratified, seeded); the sites divide the rest",
    )
    defenses: list[DefenseSettings] = Field(
        default_factory=lambda: [DefenseSettings()],
        min_length=1,
        description="one row per setting, for split and split-u (gradient_noise for split-u "
        "only; a row that does not set it has none); the undefended run and the defaults "
        "are always added first",
    )
    attack_epochs: int = Field(
        60, ge=1, le=10_000, description="epochs the attacker trains its inversion decoder"
    )
    dcor_samples: int = Field(
        500, ge=4, le=5000, description="records the distance correlation is computed on"
    )

    def settings(self) -> list[DefenseSettings]:
        """The defense rows, each once: undefended first, then the job defaults (in split-u:
        noise on the returned gradients), then the configured ones -- each exactly as written:
        a row that leaves ``gradient_noise`` out has none."""
        rows = [DefenseSettings(gradient_noise=0.0), DefenseSettings()]
        for defense in self.defenses:
            explicit = (
                defense
                if defense.gradient_noise is not None
                else defense.model_copy(update={"gradient_noise": 0.0})
            )
            if explicit not in rows:
                rows.append(explicit)
        return rows


class ExperimentConfig(BaseModel):
    """A grid of modes x partitions x site counts x seeds on one dataset. See docs/experiments.md."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=ID_PATTERN)
    dataset: str = "breast-cancer"
    modes: list[ExperimentMode] = Field(default_factory=lambda: list(ALL_MODES), min_length=1)
    orchestrations: list[Orchestration] = Field(
        default_factory=lambda: [Orchestration.SEQUENTIAL],
        min_length=1,
        description="for split and split-u; fedavg and flop always run parallel rounds",
    )
    partitions: list[str] = Field(default_factory=lambda: ["iid"], min_length=1)
    sites: list[int] = Field(default_factory=lambda: [3], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    rounds: int = Field(10, ge=1, le=10_000)
    local_epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=65_536)
    optimizer: OptimizerConfig = OptimizerConfig()
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="the jobs' training.class_weights (baselines use the same)"
    )
    threshold: float = Field(0.5, gt=0, lt=1, description="the jobs' training.threshold")
    sample_fraction: float = Field(1.0, gt=0, le=1)
    wire_dtypes: list[WireDtype] = Field(
        default_factory=lambda: list[WireDtype](["float32"]),
        min_length=1,
        description="for split and split-u: each is its own row, so the accuracy cost of a "
        "narrower wire reads next to float32; the other modes send no activations",
    )
    plans: Plans = Plans()
    privacy: PrivacySettings | None = Field(
        None,
        description="attacks and defense settings of medsplit privacy; given here, medsplit "
        "experiment runs the privacy sweep after its grid too",
    )
    broker: BrokerConfig | None = Field(
        None,
        description="a loopback plaintext broker (mqtt://) to use; default: start Mosquitto "
        "here (or the embedded amqtt broker). Every party of an experiment runs in one process "
        "under one identity, so experiments never use a federation's mutual TLS",
    )
    out: Path | None = Field(None, description="default: runs/experiments/NAME")
    timeout_s: float = Field(3600.0, gt=0, description="per distributed job")

    _known_dataset = field_validator("dataset")(lambda cls, name: check_name(name))

    @model_validator(mode="before")
    @classmethod
    def _one_wire_dtype(cls, data: Any) -> Any:
        """``wire_dtype: X`` (one value, as before) means ``wire_dtypes: [X]``."""
        if isinstance(data, dict) and "wire_dtype" in data and "wire_dtypes" not in data:
            data = dict(data)
            data["wire_dtypes"] = [data.pop("wire_dtype")]
        return data

    @field_validator("partitions")
    @classmethod
    def _known_partitions(cls, schemes: list[str]) -> list[str]:
        for scheme in schemes:
            parse_scheme(scheme)
        return schemes

    @field_validator("sites")
    @classmethod
    def _site_counts(cls, counts: list[int]) -> list[int]:
        if any(n < 1 or n > 1000 for n in counts):
            raise ValueError(f"site counts must be between 1 and 1000, got {counts}")
        return counts

    @model_validator(mode="after")
    def _jobs_validate(self) -> ExperimentConfig:
        # Build every job once: a bad plan/mode combination fails now, naming the cell.
        models = {}
        for cell in self.cells():
            try:
                job = self.job_config(cell, broker_url="mqtt://127.0.0.1:1883")
            except ConfigError as exc:
                raise ValueError(f"{cell.label()}: {exc}") from None
            models[cell.mode] = job.plan.model
        if len({m.model_dump_json() for m in models.values()}) > 1:
            raise ValueError(
                "plans: every mode must train the same model so the comparison is fair; "
                f"got {', '.join(f'{mode}: {m.name} {m.args}' for mode, m in models.items())}"
            )
        return self

    @property
    def output_dir(self) -> Path:
        return self.out or Path("runs") / "experiments" / self.name

    @property
    def privacy_settings(self) -> PrivacySettings:
        return self.privacy or PrivacySettings()

    def plan_for(self, mode: str) -> str | dict[str, Any]:
        family = plan_family(mode)
        chosen = {"federated": self.plans.federated, "split": self.plans.split}.get(
            family, self.plans.split_u
        )
        return chosen or dataset_plan(self.dataset, family)

    def cells(self) -> list[Cell]:
        """Every run of the grid, baselines first, in a stable order."""
        cells = []
        for partition, sites, mode, seed in itertools.product(
            self.partitions, self.sites, self.modes, self.seeds
        ):
            orchestrations: list[str] = list(self.orchestrations)
            if mode in BASELINES:
                orchestrations = ["none"]  # no network, no rounds to orchestrate
            elif mode not in SPLIT_MODES:
                orchestrations = [MODES[Mode(mode)].default_orchestration.value]
            wires = list(self.wire_dtypes) if mode in SPLIT_MODES else ["float32"]
            for orchestration, wire in itertools.product(orchestrations, wires):
                cells.append(Cell(mode, orchestration, partition, sites, seed, wire))
        return cells

    def job_config(self, cell: Cell, broker_url: str, protocol: str = "5") -> JobConfig:
        site_ids = [f"site-{i + 1:02d}" for i in range(cell.sites)]
        job: dict[str, Any] = {
            "job_id": cell.job_id(self.name),
            "plan": self.plan_for(cell.mode),
            "mode": cell.mode if cell.mode not in BASELINES else "fedavg",
            "seed": cell.seed,
            "sites": site_ids,
            "dataset": self.dataset,
            "rounds": {
                "count": self.rounds,
                # Sequential rounds visit every site; sampling applies to parallel rounds only.
                "sample_fraction": 1.0
                if cell.orchestration == "sequential"
                else self.sample_fraction,
                "deadline_s": self.timeout_s,
                "join_deadline_s": min(self.timeout_s, 120.0),
            },
            "training": {
                "local_epochs": self.local_epochs,
                "batch_size": self.batch_size,
                "optimizer": self.optimizer.model_dump(),
                "wire_dtype": cell.wire_dtype,
                "class_weights": self.class_weights,
                "threshold": self.threshold,
            },
            # Every party of an experiment runs in this process under one identity: the
            # broker is a loopback one, plaintext, and the config says so (docs/security.md).
            "broker": {"url": broker_url, "protocol": protocol, "insecure": True},
            "state": {"run_dir": str(self.output_dir / "runs" / cell.job_id(self.name))},
        }
        if cell.defense != DefenseSettings():  # as written: "none" turns the defaults off too
            job["defenses"] = cell.defense.model_dump(exclude_none=True)
        if cell.orchestration != "none":
            job["orchestration"] = cell.orchestration
        config: JobConfig = JobConfig.from_mapping(job, f"<experiment {self.name}>")
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> ExperimentConfig:
        config: ExperimentConfig = validate(cls, load_yaml_mapping(path), str(path))
        return config


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    mode: str
    orchestration: str  # "none" for the baselines
    partition: str
    sites: int
    seed: int
    wire_dtype: str = "float32"
    defense: DefenseSettings = field(default_factory=DefenseSettings)  # the privacy axis

    def label(self) -> str:
        defense = f", defense {self.defense.label()}" if self.defense != DefenseSettings() else ""
        return f"{self.method}, {self.partition}, {self.sites} sites, seed {self.seed}{defense}"

    @property
    def method(self) -> str:
        """The row name in the results: the mode, plus the orchestration for split modes."""
        if self.mode not in SPLIT_MODES:
            return self.mode
        if self.wire_dtype != "float32":
            return f"{self.mode} ({self.orchestration}, {self.wire_dtype} wire)"
        return f"{self.mode} ({self.orchestration})"

    def job_id(self, experiment: str) -> str:
        wire = "" if self.wire_dtype == "float32" else f"-{self.wire_dtype}"
        label = self.defense.label()
        defense = "" if label == "none" else f"-{label}"
        text = (
            f"{experiment}-{self.mode}-{self.orchestration}{wire}{defense}-{self.partition}-"
            f"{self.sites}s-{self.seed}"
        )
        text = re.sub(r"[^A-Za-z0-9_.-]", "_", text)
        if len(text) <= 64:
            return text
        return f"{text[:55]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
