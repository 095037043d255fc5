"""The aggregator's share of split learning: the trunk (and, in vanilla split, the loss).

Each method answers one uplink message and returns the tensors of the reply.

* **Sequential** rounds (one site at a time) train the one trunk with one optimizer for the
  whole job, so split training equals centralized training step for step.
* **Parallel** rounds follow SplitFed V1 (Thapa et al., arXiv 2004.12088): each site trains
  its own server-side copy of the trunk during a turn (``open_turn`` starts every copy from the
  global trunk; each copy keeps its own optimizer across rounds), and ``close_turn`` replaces
  the trunk by the sample-weighted mean of the copies of the sites whose updates counted. A
  site's steps never see another site's, so the result does not depend on how the sites'
  messages interleave on the network: the same seed gives the same trunk, and a resumed job
  reproduces an uninterrupted one.

U-shaped steps keep their forward graph until the tail's gradient comes back: at most one per
site (a site sends its next step only after its last one was answered), for the current round
only, so no sender can make the aggregator hold more.

``open_turn`` also remembers where the turn started (the trunk and its optimizer, or in parallel
rounds each site's optimizer). When a site's steps are void -- it restarted mid-turn, or was
missed at the deadline -- ``forget`` puts its share of the trunk back there: the restarted site
redoes the turn from its own snapshot of the same moment, so the redone turn is the turn it
would have been.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from medsplit.aggregation import weighted_average
from medsplit.config import OptimizerConfig
from medsplit.devices import to_device
from medsplit.precision import MixedPrecision
from medsplit.snapshots import load_optimizer, optimizer_tensors
from medsplit.training import entry, loss_fn, make_optimizer


class Trunk:
    def __init__(
        self,
        trunk: nn.Module,
        optimizer: OptimizerConfig,
        device: torch.device,
        *,
        parallel: bool = False,
        precision: str = "fp32",
    ) -> None:
        self.module = trunk.to(device)
        # Vanilla split computes the loss here: with the job's class weights, once known.
        self.class_weights: torch.Tensor | None = None
        self.precision = precision
        self.device = device
        self.parallel = parallel
        self._optimizer_config = optimizer
        self.optimizer = make_optimizer(self.module.parameters(), optimizer)
        # Parallel rounds: each site's server-side copy and its optimizer (SplitFed V1).
        self._copies: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
        # One open U-shaped step per site: (round, step, input, output).
        self._pending: dict[str, tuple[int, int, torch.Tensor, torch.Tensor]] = {}
        # Where the turn started, per site: (trunk weights, optimizer state).
        self._turn_start: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        # Autocast and (fp16) loss scaling; parallel rounds: one per server-side copy.
        self._amp: dict[str, MixedPrecision] = {}

    # -- turns -------------------------------------------------------------------------------------

    def open_turn(self, sites: tuple[str, ...]) -> None:
        """Every site of the turn starts from the global trunk (parallel: its own copy)."""
        self._turn_start = {}
        for site in sites:
            module, optimizer = self._for(site)
            if module is not self.module:
                module.load_state_dict(self.module.state_dict())
            self._turn_start[site] = (
                {k: v.detach().clone() for k, v in module.state_dict().items()},
                copy.deepcopy(optimizer.state_dict()),
            )

    def close_turn(self, samples: Mapping[str, int]) -> None:
        """Parallel: the trunk becomes the mean of the copies whose sites' updates counted.
        Past this point nothing of the turn can be void any more."""
        self._pending.clear()
        self._turn_start = {}
        if not self.parallel or not samples:
            return
        states = [self._copies[site][0].state_dict() for site in samples if site in self._copies]
        weights = [float(samples[site]) for site in samples if site in self._copies]
        if states:
            self.module.load_state_dict(weighted_average(states, weights))

    def _copy(self, site: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        if site not in self._copies:
            module = copy.deepcopy(self.module)
            self._copies[site] = (
                module,
                make_optimizer(module.parameters(), self._optimizer_config),
            )
        return self._copies[site]

    def _for(self, site: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        return self._copy(site) if self.parallel else (self.module, self.optimizer)

    def _precision(self, site: str) -> MixedPrecision:
        key = site if self.parallel else ""
        if key not in self._amp:
            self._amp[key] = MixedPrecision(self.precision, self.device)
        return self._amp[key]

    # -- steps -------------------------------------------------------------------------------------

    def split_step(self, site: str, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Vanilla split: forward, loss, backward, update; returns the head's gradient."""
        module, optimizer = self._for(site)
        amp = self._precision(site)
        module.train()
        h = to_device(h, self.device).requires_grad_()
        optimizer.zero_grad()
        with amp.autocast():
            loss = loss_fn(module(entry(h)), to_device(y, self.device), self.class_weights)
        amp.backward(loss)
        assert h.grad is not None
        grad = amp.unscaled(h.grad).cpu()
        amp.step(optimizer)
        return grad, float(loss.detach())

    def forward(self, site: str, round: int, step: int, h: torch.Tensor) -> torch.Tensor:
        """U-shaped, first half: trunk output for the site's tail; the graph is kept."""
        module, _ = self._for(site)
        module.train()
        h = to_device(h, self.device).requires_grad_()
        with self._precision(site).autocast():
            out: torch.Tensor = module(entry(h))
        self._pending[site] = (round, step, h, out)  # replaces any step the site gave up
        return out.detach().float().cpu()

    def backward(self, site: str, round: int, step: int, grad: torch.Tensor) -> torch.Tensor | None:
        """U-shaped, second half: backward from the tail's gradient, update, head gradient.

        None when the forward pass it belongs to is not the site's open step (forgotten after
        a restart or a deadline, or a replay).
        """
        pending = self._pending.get(site)
        if pending is None or pending[:2] != (round, step):
            return None
        del self._pending[site]
        _, _, h, out = pending
        _, optimizer = self._for(site)
        amp = self._precision(site)
        optimizer.zero_grad()
        amp.backward(out, to_device(grad, self.device).to(out.dtype))
        assert h.grad is not None
        head_grad = amp.unscaled(h.grad).cpu()
        amp.step(optimizer)
        return head_grad

    def evaluate(self, h: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        with torch.no_grad(), MixedPrecision(self.precision, self.device).autocast():
            out: torch.Tensor = self.module(to_device(h, self.device))
        return out.float().cpu()

    def forget(self, site: str) -> None:
        """The site's steps of this turn are void: drop its open step and put its share of the
        trunk back where the turn started."""
        self._pending.pop(site, None)
        start = self._turn_start.get(site)
        if start is not None:
            module, optimizer = self._for(site)
            module.load_state_dict(start[0])
            optimizer.load_state_dict(copy.deepcopy(start[1]))

    @property
    def open_steps(self) -> int:
        return len(self._pending)

    # -- checkpoints ---------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        """The trunk and every optimizer (between turns: the copies' weights are the trunk's),
        as views of the live tensors: write them out before the next step."""
        tensors = {f"trunk/{k}": v.detach().cpu() for k, v in self.module.state_dict().items()}
        opt, document = optimizer_tensors(self.optimizer, "trunk-optimizer", copy=False)
        tensors |= opt
        copies: dict[str, object] = {}
        for site, (_, optimizer) in self._copies.items():
            site_opt, site_doc = optimizer_tensors(optimizer, f"trunk-optimizer@{site}", copy=False)
            tensors |= site_opt
            copies[site] = site_doc
        for key, amp in self._amp.items():  # fp16 loss scales ("" in sequential rounds)
            tensors |= amp.state(f"trunk-amp@{key}")
        return tensors, {"optimizer": document, "copies": copies}

    def load_state(
        self, tensors: Mapping[str, torch.Tensor], document: Mapping[str, object]
    ) -> None:
        own = {k.removeprefix("trunk/"): v for k, v in tensors.items() if k.startswith("trunk/")}
        self.module.load_state_dict(own)
        optimizer_doc = document["optimizer"]
        assert isinstance(optimizer_doc, Mapping)
        load_optimizer(self.optimizer, tensors, optimizer_doc, "trunk-optimizer")
        copies = document.get("copies") or {}
        assert isinstance(copies, Mapping)
        for site, site_doc in copies.items():
            module, optimizer = self._copy(site)
            module.load_state_dict(self.module.state_dict())
            load_optimizer(optimizer, tensors, site_doc, f"trunk-optimizer@{site}")
        for name in tensors:
            if name.startswith("trunk-amp@") and name.endswith("/scale"):
                key = name.removeprefix("trunk-amp@").removesuffix("/scale")
                self._precision(key).load(tensors, f"trunk-amp@{key}")
