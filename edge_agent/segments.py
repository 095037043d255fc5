"""The layers a site runs: head and (U-shaped) tail, with their optimizer.

Kept apart from the protocol so the arithmetic of a split step reads in one place.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from medsplit.modes import Mode
from medsplit.precision import MixedPrecision
from medsplit.protocol import JobSpec
from medsplit.training import make_optimizer
from models import split_model
from models.vertical import party_head, vertical_args


class EdgeSegments:
    def __init__(self, spec: JobSpec, device: torch.device, party: str | None = None) -> None:
        """``party``: in a vertical job, the site whose own head (and, at the label party,
        the tail) this holds -- built from the job seed, as the joined model is, and never
        replaced by weights from elsewhere."""
        # Horizontal jobs: the weights are overwritten by the aggregator's anyway.
        parts = split_model(spec.plan.model.build(seed=spec.seed), spec.plan)
        self.device = device
        head, tail = parts.head, parts.tail
        if spec.mode == Mode.VERTICAL:
            assert party is not None
            head = party_head(head, party)
            tail = tail if party == vertical_args(spec.plan.model.args).label_party else None
        self.head: nn.Module = head.to(device)
        self.tail: nn.Module | None = tail.to(device) if tail is not None else None
        params = list(self.head.parameters()) + (list(self.tail.parameters()) if self.tail else [])
        self.optimizer = make_optimizer(params, spec.optimizer)
        self.amp = MixedPrecision(spec.precision, device)  # autocast, fp16 loss scaling

    def modules(self) -> list[nn.Module]:
        return [self.head] + ([self.tail] if self.tail is not None else [])

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load head (and tail) weights handed over by the aggregator."""
        for module in self.modules():
            own = {k: state[k] for k in module.state_dict()}
            module.load_state_dict(own)

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the head (and tail) weights: never the live parameters, which go on
        training while what was sent (or kept to be sent again) must not change."""
        out: dict[str, torch.Tensor] = {}
        for module in self.modules():
            out.update({k: v.detach().cpu().clone() for k, v in module.state_dict().items()})
        return out

    def full_state(self) -> dict[str, torch.Tensor]:
        return self.state()

    def start_round(self) -> None:
        """Split learning keeps one optimizer for the whole job (exactness with centralized)."""

    def train(self, mode: bool = True) -> None:
        for module in self.modules():
            module.train(mode)
