"""Checks a plan must pass before a job trains with it: the cuts put the model back together
exactly, and every segment exports to ONNX.

A plan that validates names real modules and cuts where one tensor crosses; this goes one
step further and runs it: a seeded build on the CPU, a batch through the whole model and
through head, trunk and tail in turn (they must agree to the bit: the segments are the same
operations), then each segment through the same exporter and parity check as a site's final
model. ``medsplit plan`` and ``medsplit demo`` run all of it; the aggregator, whose image has
no ONNX stack, runs the recomposition only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.config_errors import ModelError
from models.plan import SplitPlan
from models.split import split_model


class PlanCheckError(ModelError):
    """The plan does not run as a split model; the message says which part failed."""


@dataclass(frozen=True)
class PlanCheck:
    """What was checked: the largest difference found, and each segment's ONNX size."""

    max_abs_diff: float
    onnx_bytes: dict[str, int] = field(default_factory=dict)


SEGMENT_NAMES = ("head", "trunk", "tail")


def check_recomposition(plan: SplitPlan, batch: int = 2) -> tuple[float, list[torch.Tensor]]:
    """Head, trunk and tail in turn compute exactly what the whole model computes.

    Returns the difference (0.0) and the inputs each segment saw, for the export check.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model = plan.model.build(seed=0).eval()
        parts = split_model(model, plan)
        x = torch.randn(
            (batch, *plan.model.input_shape), generator=torch.Generator().manual_seed(0)
        )
        expected = model(x)
        inputs, out = [], x
        for segment in parts.segments():
            inputs.append(out)
            out = segment(out)
    if not isinstance(expected, torch.Tensor):
        raise PlanCheckError(
            f"the network returns {type(expected).__name__}, not one tensor of logits; wrap it "
            "in a module that returns the logits"
        )
    if out.shape != expected.shape:
        raise PlanCheckError(
            f"the segments end in shape {list(out.shape)}, the model in {list(expected.shape)}"
        )
    diff = float((out - expected).abs().max())
    if diff != 0.0:
        raise PlanCheckError(
            f"head, trunk and tail differ from the whole model by up to {diff:.3g}; the cut "
            "changes what the model computes"
        )
    return diff, inputs


def check_plan(plan: SplitPlan, *, export: bool = True) -> PlanCheck:
    """Recomposition, and (``export``) every segment exported to ONNX with a parity check."""
    diff, inputs = check_recomposition(plan)
    if not export:
        return PlanCheck(diff)
    from models.onnx_export import ExportError, export_onnx  # noqa: PLC0415 (edge extra)

    sizes: dict[str, int] = {}
    with torch.random.fork_rng(devices=[]):
        parts = split_model(plan.model.build(seed=0).eval(), plan)
    for name, segment, sample in zip(SEGMENT_NAMES, parts.segments(), inputs, strict=False):
        try:
            sizes[name] = export_onnx(segment.eval(), sample).bytes
        except ExportError as exc:
            raise PlanCheckError(f"the {name} does not export to ONNX: {exc}") from None
    return PlanCheck(diff, sizes)
