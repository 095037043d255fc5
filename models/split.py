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
    """The three segments; ``tail`` is None for vanilla (non-U-shaped) split learning.

    Built-in models give ``nn.Sequential`` slices; traced networks give ``torch.fx`` graph
    modules (``models.graph_split``). Either way a segment's state-dict keys are the model's.
    """

    head: nn.Module
    trunk: nn.Module
    tail: nn.Module | None

    def segments(self) -> list[nn.Module]:
        return [part for part in (self.head, self.trunk, self.tail) if part is not None]

    def segment_keys(self) -> tuple[list[str], list[str], list[str]]:
        """The state-dict keys of head, trunk and tail (empty without a tail)."""
        tail = list(self.tail.state_dict()) if self.tail is not None else []
        return list(self.head.state_dict()), list(self.trunk.state_dict()), tail


def _select(model: nn.Sequential, names: tuple[str, ...]) -> nn.Sequential:
    blocks = model._modules
    return nn.Sequential(OrderedDict((name, blocks[name]) for name in names))


def split_model(model: nn.Module, plan: SplitPlan) -> SplitModel:
    """Cut ``model`` (built from ``plan.model``) into head, trunk and tail.

    The segments share modules with ``model``; deep-copy first to get independent weights.
    """
    if plan.model.traced:
        from torch import fx  # noqa: PLC0415

        from models.graph_split import split_graph  # noqa: PLC0415

        if not isinstance(model, fx.GraphModule):
            raise ValueError("a traced plan's model is the graph module ModelSpec.build returns")
        head, trunk, *tail = split_graph(model, plan.cuts)
        return SplitModel(head=head, trunk=trunk, tail=tail[0] if tail else None)
    assert isinstance(model, nn.Sequential)
    expected = plan.model.layers
    actual = tuple(model._modules)
    if actual != expected:
        raise ValueError(
            f"model blocks {list(actual)} do not match the plan's architecture {list(expected)}"
        )
    return SplitModel(
        head=_select(model, plan.head),
        trunk=_select(model, plan.trunk),
        tail=_select(model, plan.tail) if plan.u_shaped else None,
    )


class Recomposed(nn.Module):
    """Segments run one after the other, holding their modules under the original names.

    Two segments of a traced network may both hold a container (``features``) with different
    children; the containers are merged, so the state-dict keys are the full model's.
    """

    def __init__(self, segments: list[nn.Module]) -> None:
        super().__init__()
        self._chain = tuple(segments)  # not registered: the merged tree holds the weights
        for segment in segments:
            _graft(self, segment)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for segment in self._chain:
            x = segment(x)
        return x


def _graft(target: nn.Module, source: nn.Module) -> None:
    for name, tensor in source._parameters.items():
        if tensor is not None:
            target.register_parameter(name, tensor)
    for name, buffer in source._buffers.items():
        if buffer is not None:
            target.register_buffer(name, buffer)
    for name, child in source._modules.items():
        assert child is not None
        if type(child) is nn.Module:  # a path container fx made: merged, never shared
            existing = target._modules.get(name)
            if existing is None:
                existing = nn.Module()
                target.add_module(name, existing)
            _graft(existing, child)
        elif name in target._modules:
            raise ValueError(f"module {name!r} appears in more than one segment")
        else:
            target.add_module(name, child)


def assemble(parts: SplitModel | list[nn.Module]) -> nn.Module:
    """Re-assemble segments, in order, into one model with the original names."""
    segments = parts.segments() if isinstance(parts, SplitModel) else parts
    return Recomposed(segments)


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
    with torch.no_grad():
        parts = split_model(plan.model.build(seed=0).eval(), plan)
        h = parts.head(torch.zeros((1, *plan.model.input_shape)))
        shapes = {"head_out": (batch_size, *h.shape[1:])}
        t = parts.trunk(h)
        if parts.tail is not None:
            shapes["trunk_out"] = (batch_size, *t.shape[1:])
            t = parts.tail(t)
        shapes["logits"] = (batch_size, *t.shape[1:])
    return shapes
