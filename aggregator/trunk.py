"""The aggregator's share of split learning: the trunk (and, in vanilla split, the loss).

Each method answers one uplink message and returns the tensors of the reply. Activations of
steps still waiting for their ``trunk-grad`` (U-shaped) are kept per (site, round, step). In
parallel orchestration another site's update can land between a step's forward and backward;
that step's forward is then recomputed with the current weights before its backward (autograd
would otherwise refuse the in-place update), which is the usual SplitFed behaviour. Sequential
orchestration never interleaves, so its gradients are exact.
"""

from __future__ import annotations

import torch
from torch import nn

from medsplit.config import OptimizerConfig
from medsplit.training import loss_fn, make_optimizer


class Trunk:
    def __init__(
        self, trunk: nn.Sequential, optimizer: OptimizerConfig, device: torch.device
    ) -> None:
        self.module = trunk.to(device)
        self.device = device
        self.optimizer = make_optimizer(self.module.parameters(), optimizer)
        self._pending: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._updates = 0  # optimizer steps taken so far

    def split_step(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Vanilla split: forward, loss, backward, update; returns the head's gradient."""
        self.module.train()
        h = h.to(self.device).requires_grad_()
        self.optimizer.zero_grad()
        loss = loss_fn(self.module(h), y.to(self.device))
        loss.backward()
        self.optimizer.step()
        self._updates += 1
        assert h.grad is not None
        return h.grad.cpu(), float(loss.detach())

    def forward(self, site: str, round: int, step: int, h: torch.Tensor) -> torch.Tensor:
        """U-shaped, first half: trunk output for the site's tail; the graph is kept."""
        self.module.train()
        h = h.to(self.device).requires_grad_()
        out: torch.Tensor = self.module(h)
        self._pending[(site, round, step)] = (h, out, self._updates)
        return out.detach().cpu()

    def backward(self, site: str, round: int, step: int, grad: torch.Tensor) -> torch.Tensor | None:
        """U-shaped, second half: backward from the tail's gradient, update, head gradient."""
        pending = self._pending.pop((site, round, step), None)
        if pending is None:
            return None
        h, out, updates_then = pending
        if updates_then != self._updates:  # weights moved since the forward pass
            h = h.detach().requires_grad_()
            out = self.module(h)
        self.optimizer.zero_grad()
        out.backward(grad.to(self.device))
        self.optimizer.step()
        self._updates += 1
        assert h.grad is not None
        return h.grad.cpu()

    def evaluate(self, h: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        with torch.no_grad():
            out: torch.Tensor = self.module(h.to(self.device))
        return out.cpu()

    def forget(self, site: str) -> None:
        """Drop the kept graphs of a site that left mid-round."""
        for key in [k for k in self._pending if k[0] == site]:
            del self._pending[key]
