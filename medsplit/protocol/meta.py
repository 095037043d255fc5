"""The metadata of every message kind, as strict schemas checked with the envelope.

An envelope's ``meta`` is a small JSON object that a peer fills in. Its values decide things
(how many samples an update weighs, which round a site's traffic belongs to) and end up in
``/status``, ``/metrics`` and report.json, so a peer holding a valid certificate must not be
able to put a string where a number goes, a NaN where a loss goes, or a field nobody reads:
each kind has one pydantic model here (strict types, finite numbers, bounds, lengths, no extra
fields), and a receiver checks a message's header against it before the message reaches any
state (``check``). A violation is a ``BadMeta`` wire error: counted by reason, answered with a
throttled error reply, never an exception in a state machine.

``MessageRules`` adds what a receiver knows of its job: the kinds a site may send in the job's
mode (activations in a federated job are refused as ``UnexpectedKind``, not counted as late).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from medsplit.config import MAX_MICRO_BATCHES
from medsplit.modes import Mode, labels_travel, traits
from medsplit.protocol.kinds import Kind
from medsplit.wire import Envelope, Header
from medsplit.wire.errors import BadMeta, UnexpectedKind

MAX_COUNT = 10**9  # samples a site may declare: more than any hospital holds
MAX_BYTES = 2**62  # running traffic totals
MAX_SECONDS = 10.0**7  # about four months
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Loss = float  # any finite number: a poisoned model can have an enormous loss
Token = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
Text = Annotated[str, StringConstraints(max_length=1000)]


class Meta(BaseModel):
    """Strict: no coercion ("1" is not 1), no NaN or infinity, no field left unnamed."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    epoch: Token | None = None  # every message from the aggregator carries its incarnation


# -- site -> aggregator -----------------------------------------------------------------------


class HelloMeta(Meta):
    train_samples: Count = 0  # what a site declares first bounds what it may claim later
    test_samples: Count = 0
    incarnation: Token | None = None  # None: each hello counts as its own agent process


class StatsMeta(Meta):
    count: Annotated[int, Field(ge=1, le=MAX_COUNT)]  # values summed: records, or pixels
    records: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None  # training records


class DoneMeta(Meta):
    samples: Count
    train_loss: Loss | None = None  # None: the loss was not a finite number
    train_seconds: Seconds = 0.0
    # Split modes: where the round's time went.
    exchange_seconds: Seconds | None = None
    codec_seconds: Seconds | None = None
    steps: Annotated[int, Field(ge=0, le=MAX_COUNT)] | None = None
    epsilon: Annotated[float, Field(ge=0, le=1e9)] | None = None  # the site's, so far


class MetricsMeta(Meta):
    loss: Loss | None = None
    accuracy: Fraction | None = None
    auroc: Fraction | None = None
    # The clinicians' metrics (medsplit.evaluation); the tally they come from are its tensors.
    balanced_accuracy: Fraction | None = None
    macro_auroc: Fraction | None = None
    sensitivity: Fraction | None = None
    specificity: Fraction | None = None
    ece: Fraction | None = None
    samples: Count = 0
    bytes_up: Annotated[int, Field(ge=0, le=MAX_BYTES)] = 0
    bytes_down: Annotated[int, Field(ge=0, le=MAX_BYTES)] = 0
    epsilon: Annotated[float, Field(ge=0, le=1e9)] | None = None  # the site's, so far


class AlignedMeta(Meta):
    """A vertical party's answer to a stage of the alignment: a set size, where the stage
    has one (the label party's keys still asked about; the common patients)."""

    size: Count | None = None


class ErrorMeta(Meta):
    error: Token
    detail: Text = ""
    topic: Text | None = None


class NoMeta(Meta):
    """Kinds whose meaning is all in their tensors and header."""


MicroIndex = Annotated[int, Field(ge=0, lt=MAX_MICRO_BATCHES)]
MicroCount = Annotated[int, Field(ge=1, le=MAX_MICRO_BATCHES)]


class ServesMeta(Meta):
    """A cut-layer message of a train or evaluate request: ``serves`` is that request's message
    id. A vertical job takes a party's step only for the request open with it, so steps of an
    attempt the round gave up (a party restarted and every party redoes the round) never
    count."""

    serves: Token | None = None


class StepMeta(ServesMeta):
    """A training step's cut-layer message, site to aggregator. A pipelined step (``training.
    micro_batches``) is cut into ``micros`` micro-batches sent without waiting for each other;
    ``micro`` says which one this is. Vanilla split's activations also say the micro-batch's
    ``share`` of the batch's loss, so the trunk's accumulated gradient is the whole batch's."""

    micro: MicroIndex = 0
    micros: MicroCount = 1
    share: Annotated[float, Field(gt=0, le=1)] = 1.0

    @model_validator(mode="after")
    def _within_the_step(self) -> StepMeta:
        if self.micro >= self.micros:
            raise ValueError(f"micro {self.micro} of a step of {self.micros} micro-batches")
        return self


# -- aggregator -> site -----------------------------------------------------------------------


class SetupMeta(Meta):
    spec: Annotated[str, StringConstraints(max_length=60_000)]
    roster: Annotated[str, StringConstraints(max_length=2_000_000)] | None = None  # sealed jobs


class RefusedMeta(Meta):
    detail: Text = ""


class TrainMeta(Meta):
    epochs: Annotated[int, Field(ge=1, le=10_000)] = 1
    snapshot_every: Annotated[int, Field(ge=0, le=MAX_COUNT)] = 0
    from_step: Annotated[int, Field(ge=0, le=MAX_COUNT)] = 0
    normalization: Token | None = None
    turn: Annotated[int, Field(ge=0, le=MAX_COUNT)] = 0  # sealed jobs: the seal's place
    # Sealed jobs: the site ids a seal goes to, comma-separated (meta values are scalars).
    recipients: (
        Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._,-]*$", max_length=1_000_000)]
        | None
    ) = None


class EvaluateMeta(Meta):
    normalization: Token | None = None


AlignStage = Literal["ask", "serve", "narrow", "common", "adopt"]


class AlignMeta(Meta):
    """A stage of a vertical job's private set intersection (``aggregator.alignment``)."""

    stage: AlignStage
    partner: Token | None = None  # ask / narrow: the other party of this intersection
    asking: Count | None = None  # serve: how many keys the label party asks about


class GradientsMeta(Meta):
    loss: Loss | None = None


SCHEMAS: dict[str, type[Meta]] = {
    Kind.HELLO: HelloMeta,
    Kind.STATS: StatsMeta,
    Kind.DONE: DoneMeta,
    Kind.METRICS: MetricsMeta,
    Kind.FINISHED: NoMeta,
    Kind.ERROR: ErrorMeta,
    Kind.ACTIVATIONS: StepMeta,
    Kind.TRUNK_GRAD: StepMeta,
    Kind.EVAL_ACTIVATIONS: ServesMeta,
    Kind.ALIGNED: AlignedMeta,
    Kind.SETUP: SetupMeta,
    Kind.REFUSED: RefusedMeta,
    Kind.STATS_REQUEST: NoMeta,
    Kind.NORMALIZATION: NoMeta,
    Kind.TRAIN: TrainMeta,
    Kind.EVALUATE: EvaluateMeta,
    Kind.FINISH: NoMeta,
    Kind.GRADIENTS: GradientsMeta,
    Kind.TRUNK_OUT: NoMeta,
    Kind.ACT_GRAD: NoMeta,
    Kind.EVAL_OUT: NoMeta,
    Kind.ALIGN: AlignMeta,
}
UPLINK: frozenset[str] = frozenset(
    {Kind.HELLO, Kind.STATS, Kind.DONE, Kind.METRICS, Kind.FINISHED, Kind.ERROR}
)
CUT_LAYER_UPLINK: frozenset[str] = frozenset(
    {Kind.ACTIVATIONS, Kind.TRUNK_GRAD, Kind.EVAL_ACTIVATIONS}
)
VERTICAL_UPLINK: frozenset[str] = frozenset({Kind.ALIGNED})

M = TypeVar("M", bound=Meta)


def check(header: Header) -> Meta:
    """The header's meta as its kind's schema reads it; ``BadMeta`` says which field is wrong."""
    schema = SCHEMAS.get(header.kind)
    if schema is None:
        raise UnexpectedKind(f"{header.kind!r} is not a message kind of protocol v1")
    return _validated(schema, header.meta, header.kind)


def read_meta(schema: type[M], envelope: Envelope) -> M:
    """``envelope``'s meta as ``schema`` (already checked on arrival: this cannot fail then)."""
    return _validated(schema, envelope.meta, envelope.kind)


def _validated(schema: type[M], meta: dict[str, Any] | Any, kind: str) -> M:
    try:
        return schema.model_validate(meta)
    except ValidationError as exc:
        raise BadMeta(f"{kind} meta: {_first_problem(exc)}") from None


def _first_problem(exc: ValidationError) -> str:
    """The first problem pydantic found, as 'field: what was expected' (more are counted)."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "meta"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


class MessageRules:
    """What a receiver accepts beyond the wire's own checks: known kinds with valid meta and,
    at the aggregator, only the kinds a site sends in the job's mode."""

    def __init__(self, accepted: Iterable[str] | None = None) -> None:
        self.accepted = None if accepted is None else frozenset(accepted)

    @classmethod
    def aggregator(cls, mode: Mode | str, u_shaped: bool) -> MessageRules:
        kinds = set(UPLINK)
        if traits(mode).cut_layer:
            kinds |= CUT_LAYER_UPLINK
            if labels_travel(mode, u_shaped):  # the aggregator computes the loss
                kinds.discard(Kind.TRUNK_GRAD)
        if Mode(mode) == Mode.VERTICAL:
            kinds |= VERTICAL_UPLINK
        return cls(kinds)

    def __call__(self, header: Header) -> None:
        if self.accepted is not None and header.kind not in self.accepted:
            raise UnexpectedKind(
                f"{header.kind} is not a message this job takes from a site "
                f"(it takes {', '.join(sorted(self.accepted))})"
            )
        check(header)
