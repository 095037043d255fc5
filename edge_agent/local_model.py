"""The whole model on a site, for federated rounds (``fedavg`` and ``flop``).

A site trains every layer locally and exchanges only ``exchanged_keys``: the whole model in
``fedavg``, the shared tensors in ``flop``. Loading the global weights therefore overwrites only
those tensors; the private ones (by default the classifier) keep what this site learned, which
is the point of FLOP -- and what its reference implementation loses by loading the global model
wholesale before each local round.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from medsplit.precision import MixedPrecision
from medsplit.protocol import JobSpec, exchanged_keys
from medsplit.training import make_optimizer


class LocalModel:
    def __init__(self, spec: JobSpec, device: torch.device) -> None:
        # Every site starts from the aggregator's initial weights (private layers included).
        self.model: nn.Module = spec.plan.model.build(seed=spec.seed).to(device)
        self.device = device
        self.spec = spec
        self.keys = frozenset(exchanged_keys(spec.plan, spec.mode))
        self.private_keys = frozenset(self.model.state_dict()) - self.keys
        self.optimizer = make_optimizer(self.model.parameters(), spec.optimizer)
        self.amp = MixedPrecision(spec.precision, device)

    def start_round(self) -> None:
        """A fresh optimizer each round, as in FedAvg: old moments belong to old weights."""
        self.optimizer = make_optimizer(self.model.parameters(), self.spec.optimizer)

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take the global weights; private tensors are never touched."""
        if state.keys() != self.keys:
            missing = sorted(self.keys - state.keys())
            extra = sorted(state.keys() - self.keys)
            raise ValueError(
                f"global weights differ from the exchanged tensors: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        result = self.model.load_state_dict(dict(state), strict=False)
        assert not result.unexpected_keys
        assert set(result.missing_keys) == self.private_keys

    def load_private(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore private tensors kept in the state directory (after a restart)."""
        self.model.load_state_dict({k: state[k] for k in self.private_keys}, strict=False)

    def state(self) -> dict[str, torch.Tensor]:
        """What is sent back for averaging: the exchanged tensors only."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items() if k in self.keys}

    def full_state(self) -> dict[str, torch.Tensor]:
        """Everything, private layers included: kept in the site's state directory only."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def private_state(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().cpu().clone()
            for k, v in self.model.state_dict().items()
            if k in self.private_keys
        }

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.amp.autocast():
            out: torch.Tensor = self.model(x)
        return out.float()
