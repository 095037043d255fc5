"""Cutting a model by a plan, putting it back together, and selecting tensors by role.

The parts of a split model are views over the same block objects, and they keep the original
block names, so every part's state-dict keys are exactly the full model's keys. That is what
makes re-assembly exact (identical outputs) and lets the aggregator and the sites exchange
weights by name without any renaming table.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from models.plan import SplitPlan


@dataclass(frozen=True)
class SplitModel:
    """The three segments; ``tail`` is None for vanilla (non-U-shaped) split learning."""

    head: nn.Sequential
    trunk: nn.Sequential
    tail: nn.Sequential | None

    def segments(self) -> list[nn.Sequential]:
        return [part for part in (self.head, self.trunk, self.tail) if part is not None]


def _select(model: nn.Sequential, names: tuple[str, ...]) -> nn.Sequential:
    blocks = model._modules
    return nn.Sequential(OrderedDict((name, blocks[name]) for name in names))


def split_model(model: nn.Sequential, plan: SplitPlan) -> SplitModel:
    """Cut ``model`` (built from ``plan.model``) into head, trunk and tail.

    The segments share modules with ``model``; deep-copy first to get independent weights.
    """
    expected = plan.model.layers
    actual = tuple(model._modules)
    if actual != expected:
        raise ValueError(
            f"model blocks {list(actual)} do not match the plan's architecture {list(expected)}"
        )
    return SplitModel(
        head=_select(model, plan.head),
        trunk=_select(model, plan.trunk),
        tail=_select(model, plan.tail) if plan.tail else None,
    )


def assemble(parts: SplitModel | list[nn.Sequential]) -> nn.Sequential:
    """Re-assemble segments, in order, into one sequential model with the original names."""
    segments = parts.segments() if isinstance(parts, SplitModel) else parts
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    for segment in segments:
        for name, block in segment._modules.items():
            if name in blocks:
                raise ValueError(f"block {name!r} appears in more than one segment")
            assert block is not None
            blocks[name] = block
    return nn.Sequential(blocks)


def select_state(
    state: Mapping[str, torch.Tensor], keys: frozenset[str] | set[str]
) -> dict[str, torch.Tensor]:
    """The entries of a state dict whose keys are in ``keys`` (e.g. ``plan.shared_keys``)."""
    return {key: tensor for key, tensor in state.items() if key in keys}


def shared_state(model: nn.Module, plan: SplitPlan) -> dict[str, torch.Tensor]:
    """What a site may send for averaging: only the plan's shared tensors, detached."""
    return {k: v.detach() for k, v in select_state(model.state_dict(), plan.shared_keys).items()}


def cut_shapes(plan: SplitPlan, batch_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors that cross each cut for one batch.

    ``head_out`` is the head's output (smashed data); with a tail, ``trunk_out`` is the trunk's
    output, and ``logits`` is always the model's output. Receivers check incoming tensors against
    these before touching a model. One sample goes through a throw-away CPU copy of the model:
    milliseconds, where tracing shapes on the meta device first costs seconds of imports.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        parts = split_model(plan.model.build().eval(), plan)
        h = parts.head(torch.zeros((1, *plan.model.input_shape)))
        shapes = {"head_out": (batch_size, *h.shape[1:])}
        t = parts.trunk(h)
        if parts.tail is not None:
            shapes["trunk_out"] = (batch_size, *t.shape[1:])
            t = parts.tail(t)
        shapes["logits"] = (batch_size, *t.shape[1:])
    return shapes
