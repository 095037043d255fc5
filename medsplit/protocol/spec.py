"""The job spec sent to sites, and the tensor specs of every message.

Four modes share it. Split learning (``split``, ``split-u``) exchanges cut-layer tensors step
by step; federated learning (``fedavg``, ``flop``) exchanges weights once per round. In every
mode a round is ``train`` (weights down) -> ``done`` (weights up) -> ``evaluate`` -> ``metrics``;
which weights travel is ``exchanged_keys``: the head (and tail) in split modes, the whole model
in ``fedavg``, only the plan's shared tensors in ``flop`` -- private layers never leave a site.

``finish`` carries the final weights (``final_keys``): the global state and, in split modes
with ``release_trunk``, the trunk, so that every site can assemble and export its own model.

One training step, vanilla ``split``: ``activations`` {h, y} up, ``gradients`` {g} down.
U-shaped ``split-u``: ``activations`` {h} up, ``trunk-out`` {t} down, ``trunk-grad`` {g} up,
``act-grad`` {g} down; labels never leave the site. Evaluation never sends labels in either
mode: ``eval-activations`` {h} up, ``eval-out`` {t} down, metrics computed on the site.

Federated rounds have no cut-layer messages: a site trains the whole model locally.

Both sides derive the exact tensor specs of every message from the plan, and the ``Endpoint``
refuses anything else before it reaches a model.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from medsplit.config import (
    MAX_MICRO_BATCHES,
    AggregationSettings,
    DefenseSettings,
    OptimizerConfig,
    Precision,
)
from medsplit.evaluation import CALIBRATION_BINS, SCORE_BINS
from medsplit.modes import MODES, Mode, Orchestration, labels_travel, traits
from medsplit.protocol.kinds import Kind
from medsplit.wire import TensorSpec, WireDtype
from models import SplitPlan, cut_shapes
from models.factory import check_allowed

K = Kind


class JobSpec(BaseModel):
    """What a site must know to take part; sent in the ``setup`` message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    mode: Mode
    orchestration: Orchestration
    plan: SplitPlan
    rounds: int
    local_epochs: int
    batch_size: int
    micro_batches: Annotated[int, Field(ge=1, le=MAX_MICRO_BATCHES)] = 1  # pipelined split steps
    optimizer: OptimizerConfig
    seed: int
    wire_dtype: WireDtype
    release_trunk: bool = True
    defenses: DefenseSettings = DefenseSettings()
    # Split modes: the sites' head and tail travel sealed to the other sites (edge_agent.sealing);
    # in parallel rounds the sites combine them themselves, with the job's aggregation rule.
    sealed: bool = False
    aggregation: AggregationSettings = AggregationSettings()
    precision: Precision = "fp32"
    deterministic: bool = False
    threshold: float = 0.5  # a binary task's decision rule, for sensitivity and specificity
    # balanced: the normalization message also carries the job's class weights.
    class_weights: Literal["none", "balanced"] = "none"
    multilabel: bool = False  # multi-hot targets, one sigmoid per label
    # Vertical jobs: each party standardises its own columns over the common training rows.
    standardise_columns: bool = False
    holdout: Annotated[float, Field(gt=0, lt=1)] = 0.2  # vertical: the common rows held out

    def to_meta(self) -> str:
        """The spec as JSON. Settings at their "off" value are left out, so an agent from
        before they existed still joins such a job; one asked to defend or to seal refuses the
        spec (an unknown field) instead of silently sending undefended or plaintext tensors."""
        exclude = set()
        if not self.defenses.active:
            exclude.add("defenses")
        if not self.sealed:
            exclude |= {"sealed", "aggregation"}
        if self.precision == "fp32":
            exclude.add("precision")
        if self.micro_batches == 1:
            exclude.add("micro_batches")
        if not self.deterministic:
            exclude.add("deterministic")
        if self.threshold == 0.5:
            exclude.add("threshold")
        if self.class_weights == "none":
            exclude.add("class_weights")
        if not self.multilabel:
            exclude.add("multilabel")
        data = self.model_dump(mode="json", exclude=exclude)
        model = data["plan"]["model"]
        if model.get("name") is not None:
            model.pop("input_shape", None)  # the architecture's args give it
        for field in ("name", "factory", "weights", "weights_sha256", "leaf_modules"):
            if not model.get(field):
                model.pop(field, None)
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_meta(cls, text: Any, allow_factories: tuple[str, ...] | None = None) -> JobSpec:
        """The spec of a ``setup``. ``allow_factories`` (a site's ``models.allow``): a spec
        whose model names another factory raises ``FactoryError`` before anything is
        imported; None (the aggregator's own spec) allows any."""
        if not isinstance(text, str):
            raise ValueError("setup message carries no job spec")
        data = json.loads(text)
        if allow_factories is not None:
            factory = _named_factory(data)
            if factory is not None:
                check_allowed(factory, allow_factories)
        return cls.model_validate(data, context={"allow_factories": allow_factories})

    @property
    def labels_on_site(self) -> bool:
        return not labels_travel(self.mode, self.plan.u_shaped)

    @property
    def federated(self) -> bool:
        return MODES[self.mode].federated


def _named_factory(data: Any) -> str | None:
    plan = data.get("plan") if isinstance(data, dict) else None
    model = plan.get("model") if isinstance(plan, dict) else None
    factory = model.get("factory") if isinstance(model, dict) else None
    return str(factory) if factory is not None else None


def _in_order(plan: SplitPlan, keys: tuple[str, ...]) -> list[str]:
    wanted = set(keys)
    return [k for k in plan.model.state_keys if k in wanted]


def edge_keys(plan: SplitPlan) -> list[str]:
    """State-dict keys of the layers that live on the site: head and (U-shaped) tail."""
    return _in_order(plan, plan.head_keys + plan.tail_keys)


def exchanged_keys(plan: SplitPlan, mode: Mode | str) -> list[str]:
    """The state-dict keys that travel in ``train``/``evaluate``/``done`` for ``mode``.

    Split modes hand the site's own segments around; ``fedavg`` averages the whole model;
    ``flop`` averages only the plan's shared tensors, so private ones never leave a site;
    a ``vertical`` party's head (and the label party's tail) never leave it at all.
    """
    weights = traits(mode).weights
    if weights == "none":
        return []
    if weights == "edge":
        return edge_keys(plan)
    if weights == "all":
        return list(plan.model.state_keys)
    return [k for k in plan.model.state_keys if k in plan.shared_keys]


def final_keys(plan: SplitPlan, mode: Mode | str, release_trunk: bool) -> list[str]:
    """The keys ``finish`` carries: the final global state, plus the trunk when it is released.

    With them a site assembles its own whole model: in ``flop`` the averaged shared layers and
    its private ones, in split modes its head (and tail) and the aggregator's trunk.
    """
    keys = exchanged_keys(plan, mode)
    if traits(mode).cut_layer and release_trunk:
        keys += _in_order(plan, plan.trunk_keys)
    return keys


def _state_specs(plan: SplitPlan, keys: list[str]) -> dict[str, TensorSpec]:
    with torch.device("meta"):  # building on meta is cheap; only running on it is not
        state = plan.model.build().state_dict()
    return {k: TensorSpec(state[k].dtype, tuple(state[k].shape)) for k in keys}


PSI_TENSORS = ("request", "setup", "response", "common")  # edge_agent.alignment's messages
PSI_BYTES = TensorSpec(torch.uint8, (None,))
SEALS = "seals"  # train/evaluate/finish of a sealed job: the bundle of the last turn's seals
SEAL = "seal"  # done of a sealed job: the site's own seal
SEALED_BYTES = TensorSpec(torch.uint8, (None,))


def segments_sealed(mode: Mode | str, sealed: bool) -> bool:
    """Whether the site's segments travel sealed: asked for, and a split mode (federated
    weights are the aggregator's to combine)."""
    return sealed and traits(mode).weights == "edge"


class TensorSpecs:
    """Every message's expected tensors for one plan and mode (batch dimension free).

    In a sealed job the site's own segments never appear as tensors: ``train``, ``evaluate``
    and ``finish`` carry the ``seals`` bundle (``finish`` also the released trunk) and ``done``
    one ``seal``, as opaque bytes."""

    def __init__(
        self,
        plan: SplitPlan,
        mode: Mode | str,
        *,
        release_trunk: bool = True,
        sealed: bool = False,
        class_weights: bool = False,
        multilabel: bool = False,
    ) -> None:
        weights = _state_specs(plan, exchanged_keys(plan, mode))
        final = _state_specs(plan, final_keys(plan, mode, release_trunk))
        if segments_sealed(mode, sealed):
            weights = {SEALS: SEALED_BYTES}
            final = {SEALS: SEALED_BYTES} | {
                k: v for k, v in final.items() if k not in edge_keys(plan)
            }
        self.by_kind: dict[str, dict[str, TensorSpec]] = {
            K.TRAIN: weights,
            K.EVALUATE: weights,
            K.DONE: {SEAL: SEALED_BYTES} if SEALS in weights else weights,
            K.FINISH: final,
        }
        # The statistics round: one value per input feature (tables) or channel (images).
        channels = (plan.model.input_shape[0],)
        self.by_kind[K.STATS] = {
            "sum": TensorSpec(torch.float64, channels),
            "sum_sq": TensorSpec(torch.float64, channels),
            "classes": TensorSpec(torch.float64, (None,)),  # training records per class
        }
        # Vertical jobs' alignment: opaque PSI bytes, each tensor empty where a stage has none.
        self.by_kind[K.ALIGN] = self.by_kind[K.ALIGNED] = dict.fromkeys(PSI_TENSORS, PSI_BYTES)
        # Held-out results as counts (medsplit.evaluation.Tally); any number of classes.
        self.by_kind[K.METRICS] = {
            "confusion": TensorSpec(torch.int64, (None, 2, 2)),
            "scores": TensorSpec(torch.int32, (None, 2, SCORE_BINS)),
            "calibration": TensorSpec(torch.float64, (CALIBRATION_BINS, 3)),
        }
        self.by_kind[K.NORMALIZATION] = {
            "mean": TensorSpec(torch.float32, channels),
            "std": TensorSpec(torch.float32, channels),
        }
        if class_weights:
            self.by_kind[K.NORMALIZATION]["class_weights"] = TensorSpec(torch.float32, (None,))
        travel = labels_travel(mode, plan.u_shaped)
        if traits(mode).cut_layer:
            self.by_kind.update(_cut_layer_specs(plan, travel, multilabel))
        # A vertical job's parties send activations of their own widths (models.vertical).
        self.by_party: dict[str, dict[str, dict[str, TensorSpec]]] = (
            _party_specs(plan, travel, self.by_kind) if Mode(mode) == Mode.VERTICAL else {}
        )

    def expected(self, kind: str, party: str | None = None) -> dict[str, TensorSpec] | None:
        """Specs for ``kind`` (in a vertical job, as ``party`` sends or gets it); any other
        kind carries no tensors, so any tensor is refused."""
        own = self.by_party.get(party or "", {}).get(kind)
        return own if own is not None else self.by_kind.get(kind, {})


def _party_specs(
    plan: SplitPlan, labels_travel: bool, by_kind: dict[str, dict[str, TensorSpec]]
) -> dict[str, dict[str, dict[str, TensorSpec]]]:
    """Each vertical party's own cut-layer tensors: its activations and their gradients have
    its head's width; only the label party sends labels (when the top is the aggregator's)."""
    from models.vertical import head_outputs, vertical_args  # noqa: PLC0415

    args = vertical_args(plan.model.args)
    specs: dict[str, dict[str, dict[str, TensorSpec]]] = {}
    for party, shape in head_outputs(args).items():
        own = TensorSpec(torch.float32, (None, *shape))
        activations = {"h": own}
        if labels_travel and party == args.label_party:
            activations["y"] = by_kind[K.ACTIVATIONS]["y"]
        specs[party] = {
            K.ACTIVATIONS: activations,
            K.GRADIENTS: {"g": own},
            K.ACT_GRAD: {"g": own},
            K.EVAL_ACTIVATIONS: {"h": own},
        }
    return specs


def _cut_layer_specs(
    plan: SplitPlan, labels_travel: bool, multilabel: bool = False
) -> dict[str, dict[str, TensorSpec]]:
    """Specs of the step-by-step messages of split learning (batch dimension free)."""
    shapes = cut_shapes(plan, 1)
    head_out = TensorSpec(torch.float32, (None, *shapes["head_out"][1:]))
    labels = (
        TensorSpec(torch.float32, (None, shapes["logits"][-1]))
        if multilabel
        else TensorSpec(torch.int64, (None,))
    )
    trunk_shape = shapes.get("trunk_out", shapes["logits"])  # vanilla: trunk ends in logits
    trunk_out = TensorSpec(torch.float32, (None, *trunk_shape[1:]))
    return {
        K.ACTIVATIONS: {"h": head_out, "y": labels} if labels_travel else {"h": head_out},
        K.GRADIENTS: {"g": head_out},
        K.TRUNK_OUT: {"t": trunk_out},
        K.TRUNK_GRAD: {"g": trunk_out},
        K.ACT_GRAD: {"g": head_out},
        K.EVAL_ACTIVATIONS: {"h": head_out},
        K.EVAL_OUT: {"t": trunk_out},
    }
