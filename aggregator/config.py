"""``job.yaml``: what the aggregator runs, grouped by concern (docs/configuration.md).

* top level: the job's identity and shape -- ``job_id``, ``plan``, ``mode``, ``orchestration``,
  ``sites``, ``seed``, ``release_trunk``, ``dataset``;
* ``rounds``: how many, how long each may take, how many sites must answer, sampling;
* ``training``: what every site does in a round (epochs, batches, optimizer, wire precision);
* ``defenses``: what every site does to the cut-layer tensors it sends (docs/privacy.md);
* ``broker``, ``waits``: the shared groups of ``medsplit.config``;
* ``state``: where the run's report and weights go;
* ``checkpoint``: where the job is saved after every round, and how many saves are kept;
* ``security``: revocations the aggregator enforces itself, bounds on what a site may claim;
* ``aggregation``: by default a geometric median of updates clipped to the median norm;
* ``http``: the health endpoints a probe asks (``/healthz``, ``/readyz``).

Validation runs twice: first with the plan unchecked, so that a typo anywhere is reported in a
fraction of a second, then in full, which builds the plan's architecture (torch).
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from medsplit.config import (
    MAX_MICRO_BATCHES,
    AggregationSettings,
    BrokerConfig,
    DefenseSettings,
    DeviceChoice,
    FileSettings,
    OptimizerConfig,
    Precision,
    WaitSettings,
)
from medsplit.health import HttpSettings
from medsplit.ids import ID_PATTERN, check_site_ids
from medsplit.modes import (
    MODES,
    Mode,
    Orchestration,
    WireDtype,
    gradients_tell_labels,
    labels_travel,
)
from models import ConfigError, SplitPlan
from models.config_errors import validate

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
# True during the first pass, which leaves the plan for the second. A context variable, not
# pydantic's validation context: pydantic-settings builds the model through __init__, which
# drops that context.
_SHAPE_ONLY: ContextVar[bool] = ContextVar("shape_only", default=False)


class RoundSettings(BaseModel):
    """How many rounds, and when a round closes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(5, ge=1, le=100_000, description="rounds (epochs of the whole federation)")
    deadline_s: float = Field(
        600.0,
        gt=0,
        description="one deadline per round, training and evaluation together: a site that has "
        "not answered by then is missed for the round",
    )
    join_deadline_s: float = Field(600.0, gt=0, description="how long to wait for sites to join")
    finish_deadline_s: float = Field(
        120.0,
        ge=0,
        description="after the last round, how long to wait for every site to confirm it has "
        "its final model (a site that comes back meanwhile is sent it again)",
    )
    min_sites: int | None = Field(
        None,
        ge=1,
        description="sites that must answer for a round to count; default: a strict majority "
        "of the job's sites, and at least 2 (all of them with 1 or 2 sites), so that one "
        "refused or missing site costs its own turn, not the job",
    )
    sample_fraction: float = Field(
        1.0, gt=0, le=1, description="parallel rounds: share of sites asked to train each round"
    )


class TrainingSettings(BaseModel):
    """What every site does when asked to train."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_epochs: int = Field(1, ge=1, le=1000, description="passes over local data per round")
    multilabel: bool = Field(
        False,
        description="multi-label targets: each record may have any of the classes (one "
        "sigmoid and binary cross-entropy per label); the sites' data must say multilabel too",
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none",
        description="balanced: weigh each class in the loss by N / (classes x its records) "
        "(multi-label: (N - positives) / positives), from class counts the statistics round "
        "gathers (counts only); needs normalization: federated",
    )
    threshold: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="binary tasks: a record is called positive when the positive class's "
        "probability reaches this; sensitivity and specificity are read here",
    )
    batch_size: int = Field(32, ge=1, le=65_536, description="samples per training step")
    micro_batches: int = Field(
        1,
        ge=1,
        le=MAX_MICRO_BATCHES,
        description="split modes: cut each batch into this many micro-batches whose passes "
        "overlap across the site and the trunk (one optimizer step per batch; batch "
        "normalisation then sees micro-batches; docs/split-learning.md)",
    )
    optimizer: OptimizerConfig = OptimizerConfig()
    wire_dtype: WireDtype = Field(
        "float32", description="activations and gradients on the wire; weights stay float32"
    )
    deterministic: bool = Field(
        False,
        description="torch.use_deterministic_algorithms on the sites and the trunk (CUDA: "
        "bit-for-bit resume at some speed cost)",
    )
    precision: Precision = Field(
        "fp32",
        description="autocast for the sites' layers and the trunk: fp32, bf16, or fp16 (with "
        "a gradient scaler on each side); the cut-layer tensors stay float32",
    )


class Normalization(BaseModel):
    """Fixed input statistics, in the encoding the sites' data sources produce."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: list[float] = Field(min_length=1, description="one per input feature, or per channel")
    std: list[float] = Field(min_length=1, description="as many as mean, each > 0")

    @model_validator(mode="after")
    def _consistent(self) -> Normalization:
        if len(self.mean) != len(self.std):
            raise ValueError(f"std has {len(self.std)} values but mean has {len(self.mean)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("every std must be greater than 0")
        return self


class AggregatorState(BaseModel):
    """What the aggregator writes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_dir: Path | None = Field(
        None, description="where report.json, plots and weights go; default runs/JOB_ID"
    )


class CheckpointSettings(BaseModel):
    """Saving the job after every round, so a restarted aggregator goes on where it stopped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="write a checkpoint after every closed round")
    dir: Path | None = Field(
        None,
        description="where checkpoints go, in a folder per job id (a volume in containers, "
        "which jobs may share); default RUN_DIR/checkpoints",
    )
    keep: int = Field(3, ge=1, le=1000, description="newest checkpoints kept; older ones removed")
    every_steps: int = Field(
        0,
        ge=0,
        description="sequential split rounds: also checkpoint every this many training steps, "
        "so a long round is not redone from its start (0: after rounds only)",
    )


class SecuritySettings(BaseModel):
    """What the aggregator refuses by itself, whatever the broker lets through."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    revocations_file: Path | None = Field(
        None,
        description="revocations.json of `medsplit provision` (the aggregator's kit): a site "
        "it names is refused within check_interval_s, before the broker reloads its CRL",
    )
    check_interval_s: float = Field(
        2.0, gt=0, description="how often the revocations file is checked for a change"
    )
    roster_file: Path | None = Field(
        None,
        description="roster.json of `medsplit provision` (the aggregator's kit): every site's "
        "public sealing keys, signed by the CA; relayed to the sites in setup (seal_segments)",
    )
    sample_slack: float = Field(
        1.0,
        ge=1.0,
        description="an update may claim at most this many times the training samples the "
        "site declared when it joined; more is refused (a site cannot inflate its weight)",
    )


class JobConfig(FileSettings):
    """What the aggregator runs: the job's identity and shape, and one group per concern."""

    moved_fields: ClassVar[dict[str, str]] = {
        "rounds:scalar": "rounds.count",
        "round_deadline_s": "rounds.deadline_s",
        "join_deadline_s": "rounds.join_deadline_s",
        "min_sites": "rounds.min_sites",
        "sample_fraction": "rounds.sample_fraction",
        "local_epochs": "training.local_epochs",
        "batch_size": "training.batch_size",
        "optimizer": "training.optimizer",
        "wire_dtype": "training.wire_dtype",
        "run_dir": "state.run_dir",
    }

    job_id: Id = Field(description="names the job in every topic; sites must use the same id")
    plan: SplitPlan = Field(description="a built-in plan name, a YAML path, or the plan inline")
    device: DeviceChoice = Field(
        "cpu", description="where the trunk runs: cpu, cuda, cuda:N, or auto (a GPU if any)"
    )
    mode: Mode = Field(Mode.SPLIT_U, description="how the network is divided (docs/index.md)")
    orchestration: Orchestration = Field(
        None,  # type: ignore[assignment]  # filled in from the mode's default before validation
        description="default: sequential for split modes, parallel for fedavg/flop",
    )
    sites: list[Id] = Field(min_length=1, description="site ids expected to take part")
    seed: int = Field(0, description="initial weights, batch order and sampling derive from it")
    seal_segments: bool = Field(
        True,
        description="split modes: every site's head and tail travel sealed to the other sites "
        "(HPKE), so the aggregator relays them but cannot read them (docs/security.md); needs "
        "security.roster_file",
    )
    release_trunk: bool = Field(
        True,
        description="split modes: send each site the final trunk, so it can export its model",
    )
    dataset: str = Field("unknown", description="recorded in the report")
    normalization: Normalization | Literal["none", "federated"] = Field(
        "federated",
        description="federated: before training, every site sends counts, sums and sums of "
        "squares (never values) and all apply the combined mean and std; or fixed mean/std; or "
        "none",
    )
    rounds: RoundSettings = RoundSettings()
    training: TrainingSettings = TrainingSettings()
    defenses: DefenseSettings = Field(
        DefenseSettings(),
        description="what every site does to the cut-layer tensors it sends (docs/privacy.md)",
    )
    broker: BrokerConfig = Field(BrokerConfig(), description="the broker, shared group")
    waits: WaitSettings = Field(WaitSettings(), description="how often waits are reported")
    state: AggregatorState = Field(AggregatorState(), description="what the aggregator writes")
    checkpoint: CheckpointSettings = Field(
        CheckpointSettings(), description="saving the job to resume it (docs/operations.md)"
    )
    security: SecuritySettings = Field(
        SecuritySettings(), description="revocation and sample bounds (docs/security.md)"
    )
    aggregation: AggregationSettings = Field(
        AggregationSettings(), description="mean or robust aggregation (docs/security.md)"
    )
    http: HttpSettings = Field(
        HttpSettings(), description="/healthz and /readyz for probes (docs/deployment.md)"
    )
    file_fields: ClassVar[tuple[str, ...]] = (
        *FileSettings.file_fields,
        "security.revocations_file",
        "security.roster_file",
    )

    @classmethod
    def validated(cls, data: dict[str, Any], source: str) -> Any:
        # First pass without the plan: every other mistake is reported before torch loads.
        token = _SHAPE_ONLY.set(True)
        try:
            validate(cls, data, source)
        finally:
            _SHAPE_ONLY.reset(token)
        return validate(cls, data, source)

    @classmethod
    def resolve_paths(cls, data: dict[str, Any], base: Path | None) -> dict[str, Any]:
        # A relative plan path means "next to this config file", wherever we run from.
        data = super().resolve_paths(data, base)
        plan = data.get("plan")
        if base is not None and isinstance(plan, str) and (base / plan).is_file():
            data["plan"] = str(base / plan)
        return data

    @field_validator("plan", mode="wrap")
    @classmethod
    def _load_plan(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if _SHAPE_ONLY.get():
            if not isinstance(value, str | dict):
                raise ValueError("expected a plan name, a YAML path or a mapping")
            return value
        if isinstance(value, str):
            from models import load_plan  # noqa: PLC0415 - loads torch

            try:
                value = load_plan(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return handler(value)

    @model_validator(mode="before")
    @classmethod
    def _default_orchestration(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("orchestration") is None:
            try:
                mode = Mode(data.get("mode", Mode.SPLIT_U))
            except ValueError:
                return data  # the mode field reports it
            data = {**data, "orchestration": MODES[mode].default_orchestration}
        return data

    @field_validator("sites")
    @classmethod
    def _unique(cls, sites: list[str]) -> list[str]:
        return check_site_ids(sites)

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        rounds = self.rounds
        if rounds.sample_fraction < 1 and self.orchestration == Orchestration.SEQUENTIAL:
            raise ValueError(
                "rounds.sample_fraction: applies to parallel rounds; sequential rounds visit "
                "every site"
            )
        if rounds.min_sites is not None and rounds.min_sites > len(self.sites):
            raise ValueError(
                f"rounds.min_sites: {rounds.min_sites} is more than the {len(self.sites)} sites "
                "listed"
            )
        if self.training.multilabel and self.defenses.label_epsilon is not None:
            raise ValueError(
                "defenses.label_epsilon: randomised response draws one class per record; it "
                "does not apply to multi-label targets"
            )
        if self.training.class_weights == "balanced" and self.normalization != "federated":
            raise ValueError(
                "training.class_weights: balanced weights come from the statistics round; "
                "set normalization: federated"
            )
        if self.checkpoint.every_steps and not (
            MODES[self.mode].cut_layer and self.orchestration == Orchestration.SEQUENTIAL
        ):
            raise ValueError(
                "checkpoint.every_steps: applies to sequential split and split-u rounds, whose "
                "steps run one site at a time; other rounds are checkpointed when they close"
            )
        if self.training.micro_batches > 1 and not MODES[self.mode].cut_layer:
            raise ValueError(
                "training.micro_batches: pipelines split and split-u steps; federated modes "
                "train whole batches on the site"
            )
        _check_vertical_settings(self)
        u_shaped = _u_shaped(self.plan, self.mode)
        _check_defenses(self.defenses, self.mode, u_shaped)
        traits = MODES[self.mode]
        if traits.cut_layer:  # the mode's default label protection, said in the job's spec
            resolved = self.defenses.for_mode(gradients_tell_labels(self.mode, u_shaped))
            object.__setattr__(self, "defenses", resolved)  # frozen: set once, while validating
        if _SHAPE_ONLY.get():
            return self
        inputs = self.plan.model.input_shape[0]
        if isinstance(self.normalization, Normalization) and len(self.normalization.mean) != inputs:
            raise ValueError(
                f"normalization: the plan's model takes {inputs} input features or channels, "
                f"but {len(self.normalization.mean)} means are given"
            )
        traits = MODES[self.mode]
        if traits.u_shaped is True and not self.plan.u_shaped:
            raise ValueError(
                f"mode: {self.mode} needs a plan with a tail (set tail_cut in the plan)"
            )
        if traits.u_shaped is False and self.plan.u_shaped:
            raise ValueError(
                f"mode: {self.mode} needs a plan without a tail (remove tail_cut, or use split-u)"
            )
        _check_vertical_plan(self)
        if traits.weights == "shared" and not (self.plan.private_keys and self.plan.shared_keys):
            raise ValueError(
                f"mode: {self.mode} needs a plan with both shared and private layers "
                "(e.g. private: [classifier]); with nothing private use mode: fedavg"
            )
        return self

    @property
    def quorum(self) -> int:
        if self.mode == Mode.VERTICAL:  # every party holds columns the model needs
            return len(self.sites)
        return self.rounds.min_sites or default_quorum(len(self.sites))

    @property
    def output_dir(self) -> Path:
        return self.state.run_dir or Path("runs") / self.job_id

    @property
    def checkpoint_dir(self) -> Path:
        """This job's checkpoints: one folder per job id, so jobs can share a volume."""
        return (self.checkpoint.dir or self.output_dir / "checkpoints") / self.job_id


def default_quorum(sites: int) -> int:
    """``min_sites`` unless a job sets it: a strict majority, at least 2 (all of 1 or 2).

    One site refused or missing must not end a federation of three or more, while every
    round's model stays the work of most of its sites: a minority cannot carry a round, and
    the median update norm the default aggregation clips to is an honest site's as long as
    honest sites are the majority."""
    if sites <= 2:
        return sites
    return max(2, sites // 2 + 1)


def _u_shaped(plan: SplitPlan | dict[str, Any] | str, mode: Mode) -> bool:
    """Whether the plan has a tail -- before the plan is loaded (a first pass that does not
    load torch), as its mapping says, or for a plan's name as the mode requires."""
    if isinstance(plan, dict):
        return plan.get("tail_cut") is not None
    if isinstance(plan, str):
        return MODES[mode].u_shaped is True
    return plan.u_shaped


def _check_vertical_settings(config: JobConfig) -> None:
    """What a vertical job cannot do: its parties hold different columns of the same rows, so
    every party takes part in every step, and none has statistics to pool with another's."""
    if config.mode != Mode.VERTICAL:
        return
    if config.orchestration != Orchestration.PARALLEL:
        raise ValueError("orchestration: a vertical job's parties step together (parallel)")
    if config.rounds.min_sites not in (None, len(config.sites)):
        raise ValueError(
            f"rounds.min_sites: every party of a vertical job is needed ({len(config.sites)})"
        )
    if config.rounds.sample_fraction < 1:
        raise ValueError("rounds.sample_fraction: every party of a vertical job is needed")
    if config.training.micro_batches > 1:
        raise ValueError("training.micro_batches: vertical steps are not pipelined (use 1)")
    if isinstance(config.normalization, Normalization):
        raise ValueError(
            "normalization: in a vertical job each party standardises its own columns over "
            "the common training rows; use federated (that) or none"
        )
    if config.training.class_weights != "none":
        raise ValueError("training.class_weights: not available in vertical jobs yet")


def _check_vertical_plan(config: JobConfig) -> None:
    """A vertical job needs the vertical architecture, cut after the parties' heads, with a
    party for every site; no other mode may use that architecture."""
    is_vertical = config.plan.model.name == "vertical"
    if config.mode != Mode.VERTICAL:
        if is_vertical:
            raise ValueError("plan: the vertical architecture is for mode: vertical")
        return
    if not is_vertical:
        raise ValueError(
            "plan: mode vertical needs model.name: vertical (each party's head and the top "
            "network; docs/vertical.md)"
        )
    if config.plan.head != ("heads",):
        raise ValueError("plan.cut: a vertical plan is cut after its heads (cut: heads)")
    parties = list(config.plan.model.args["parties"])
    if sorted(parties) != sorted(config.sites):
        raise ValueError(
            f"sites: a vertical job's sites are its plan's parties ({', '.join(parties)}); "
            f"got {', '.join(config.sites)}"
        )


def _check_defenses(defenses: DefenseSettings, mode: Mode, u_shaped: bool) -> None:
    """Defenses act on cut-layer tensors: refuse one that would silently do nothing."""
    if defenses.active and not MODES[mode].cut_layer:
        raise ValueError(
            f"defenses: mode {mode} sends weights, not activations; defenses apply to split "
            "and split-u"
        )
    if defenses.gradient_noise and not gradients_tell_labels(mode, u_shaped):
        raise ValueError(
            f"defenses.gradient_noise: in mode {mode} the labels themselves travel, so noise "
            "on gradients hides nothing; use split-u to keep labels on the site (or "
            "label_epsilon: randomised response on the labels sent)"
        )
    if defenses.label_epsilon is not None and not labels_travel(mode, u_shaped):
        raise ValueError(
            f"defenses.label_epsilon: in mode {mode} no label travels; randomised response "
            "applies to split, whose labels are sent"
        )
