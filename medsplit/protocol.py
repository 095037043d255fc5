"""The split-learning protocol: message kinds, the job spec sent to sites, and tensor specs.

Uplink (site -> aggregator): ``hello``, ``activations``, ``trunk-grad``, ``done``,
``eval-activations``, ``metrics``, ``error``.
Downlink (aggregator -> site): ``setup``, ``train``, ``gradients``, ``trunk-out``, ``act-grad``,
``evaluate``, ``eval-out``, ``finish``, ``error``.

One training step, vanilla ``split``: ``activations`` {h, y} up, ``gradients`` {g} down.
U-shaped ``split-u``: ``activations`` {h} up, ``trunk-out`` {t} down, ``trunk-grad`` {g} up,
``act-grad`` {g} down; labels never leave the site. Evaluation never sends labels in either
mode: ``eval-activations`` {h} up, ``eval-out`` {t} down, metrics computed on the site.

Both sides derive the exact tensor specs of every message from the plan, and the ``Endpoint``
refuses anything else before it reaches a model.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from medsplit.training import OptimizerConfig
from medsplit.wire import TensorSpec, WireDtype
from models import SplitPlan, cut_shapes, split_model

HELLO, SETUP, TRAIN, EVALUATE, FINISH, ERROR = (
    "hello",
    "setup",
    "train",
    "evaluate",
    "finish",
    "error",
)
ACTIVATIONS, GRADIENTS, TRUNK_OUT, TRUNK_GRAD, ACT_GRAD = (
    "activations",
    "gradients",
    "trunk-out",
    "trunk-grad",
    "act-grad",
)
DONE, METRICS, EVAL_ACTIVATIONS, EVAL_OUT = "done", "metrics", "eval-activations", "eval-out"


class JobSpec(BaseModel):
    """What a site must know to take part; sent in the ``setup`` message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    mode: str
    orchestration: str
    plan: SplitPlan
    rounds: int
    local_epochs: int
    batch_size: int
    optimizer: OptimizerConfig
    seed: int
    wire_dtype: WireDtype

    def to_meta(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_meta(cls, text: Any) -> JobSpec:
        if not isinstance(text, str):
            raise ValueError("setup message carries no job spec")
        return cls.model_validate(json.loads(text))

    @property
    def labels_on_site(self) -> bool:
        return self.mode == "split-u"


def edge_keys(plan: SplitPlan) -> list[str]:
    """State-dict keys of the layers that live on the site: head and (U-shaped) tail."""
    keys = plan.model.state_keys
    edge_blocks = set(plan.head) | set(plan.tail)
    return [k for k in keys if k.split(".", 1)[0] in edge_blocks]


def _edge_state_specs(plan: SplitPlan) -> dict[str, TensorSpec]:
    with torch.device("meta"):  # building on meta is cheap; only running on it is not
        parts = split_model(plan.model.build(), plan)
    state: dict[str, torch.Tensor] = dict(parts.head.state_dict())
    if parts.tail is not None:
        state.update(parts.tail.state_dict())
    return {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in state.items()}


class TensorSpecs:
    """Every message's expected tensors for one plan and mode (batch dimension free)."""

    def __init__(self, plan: SplitPlan, mode: str) -> None:
        shapes = cut_shapes(plan, 1)
        head_out = TensorSpec(torch.float32, (None, *shapes["head_out"][1:]))
        edge_state = _edge_state_specs(plan)
        labels = TensorSpec(torch.int64, (None,))
        trunk_shape = shapes.get("trunk_out", shapes["logits"])  # vanilla: trunk ends in logits
        trunk_out = TensorSpec(torch.float32, (None, *trunk_shape[1:]))
        self.by_kind: dict[str, dict[str, TensorSpec]] = {
            ACTIVATIONS: {"h": head_out, "y": labels} if mode == "split" else {"h": head_out},
            GRADIENTS: {"g": head_out},
            TRUNK_OUT: {"t": trunk_out},
            TRUNK_GRAD: {"g": trunk_out},
            ACT_GRAD: {"g": head_out},
            EVAL_ACTIVATIONS: {"h": head_out},
            EVAL_OUT: {"t": trunk_out},
            TRAIN: edge_state,
            EVALUATE: edge_state,
            DONE: edge_state,
            HELLO: {},
            SETUP: {},
            METRICS: {},
            FINISH: {},
            ERROR: {},
        }

    def expected(self, kind: str) -> dict[str, TensorSpec] | None:
        """Specs for ``kind``; an unknown kind expects nothing, so any tensor is refused."""
        return self.by_kind.get(kind, {})
