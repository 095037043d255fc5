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

A pipelined step (``training.micro_batches``, GPipe-style) arrives as micro-batches that the
site sends without waiting for each other: the trunk accumulates their gradients and steps its
optimizer once, after the last one, so the step is the whole batch's up to float summation
order. U-shaped steps keep each micro-batch's forward graph until the tail's gradient comes
back: one open step per site (a site sends its next step only after its last one was answered)
of at most the job's ``micro_batches`` graphs, for the current round only, so no sender can make
the aggregator hold more. A step that starts again, or a new one, drops what the site had open.

``open_turn`` also remembers where the turn started (the trunk and its optimizer, or in parallel
rounds each site's optimizer). When a site's steps are void -- it restarted mid-turn, or was
missed at the deadline -- ``forget`` puts its share of the trunk back there: the restarted site
redoes the turn from its own snapshot of the same moment, so the redone turn is the turn it
would have been.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medsplit.aggregation import weighted_average
from medsplit.config import OptimizerConfig
from medsplit.devices import to_device
from medsplit.precision import MixedPrecision
from medsplit.snapshots import load_optimizer, optimizer_tensors
from medsplit.training import entry, loss_fn, make_optimizer


@dataclass
class OpenStep:
    """A site's training step in progress: the micro-batches whose forward graph awaits the
    tail's gradient (U-shaped: input, output), and those whose gradient is accumulated."""

    round: int
    step: int
    micros: int
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)

    def is_step(self, round: int, step: int, micros: int) -> bool:
        return (self.round, self.step, self.micros) == (round, step, micros)


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
        # One open training step per site.
        self._steps: dict[str, OpenStep] = {}
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
        self._steps.clear()
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

    def _open(self, site: str, round: int, step: int, micro: int, micros: int) -> OpenStep:
        """The site's step that ``micro`` belongs to. A new step -- or this micro-batch again:
        the site started the step over -- drops what the site had open, gradients included."""
        current = self._steps.get(site)
        again = current is not None and (micro in current.pending or micro in current.done)
        if current is None or again or not current.is_step(round, step, micros):
            self._for(site)[1].zero_grad()
            current = self._steps[site] = OpenStep(round, step, micros)
        return current

    def _accumulated(self, site: str, current: OpenStep, micro: int) -> None:
        """``micro``'s gradient is in; after the step's last one, the optimizer steps."""
        current.done.add(micro)
        if len(current.done) == current.micros:
            del self._steps[site]
            self._precision(site).step(self._for(site)[1])

    def split_step(  # noqa: PLR0917 -- one micro-batch's whole place in its step
        self,
        site: str,
        round: int,
        step: int,
        h: torch.Tensor,
        y: torch.Tensor,
        micro: int = 0,
        micros: int = 1,
        share: float = 1.0,
    ) -> tuple[torch.Tensor, float]:
        """Vanilla split: forward, loss (weighted by the micro-batch's ``share`` of the
        batch's), backward; the update after the step's last micro-batch. Returns the head's
        gradient and the micro-batch's own loss."""
        current = self._open(site, round, step, micro, micros)
        module, _ = self._for(site)
        amp = self._precision(site)
        module.train()
        h = to_device(h, self.device).detach().requires_grad_()  # a leaf of its own
        with amp.autocast():
            loss = loss_fn(module(entry(h)), to_device(y, self.device), self.class_weights)
        amp.backward(loss * share)  # times 1.0 unpipelined: exact
        assert h.grad is not None
        grad = amp.unscaled(h.grad).cpu()
        self._accumulated(site, current, micro)
        return grad, float(loss.detach())

    def forward(  # noqa: PLR0917
        self,
        site: str,
        round: int,
        step: int,
        h: torch.Tensor,
        micro: int = 0,
        micros: int = 1,
    ) -> torch.Tensor:
        """U-shaped, first half: trunk output for the site's tail; the graph is kept."""
        current = self._open(site, round, step, micro, micros)
        module, _ = self._for(site)
        module.train()
        h = to_device(h, self.device).detach().requires_grad_()  # a leaf of its own
        with self._precision(site).autocast():
            out: torch.Tensor = module(entry(h))
        current.pending[micro] = (h, out)
        return out.detach().float().cpu()

    def backward(
        self, site: str, round: int, step: int, grad: torch.Tensor, micro: int = 0
    ) -> torch.Tensor | None:
        """U-shaped, second half: backward from the tail's gradient (accumulated; the update
        after the step's last micro-batch), and the head's gradient.

        None when the forward pass it belongs to is not open (forgotten after a restart or a
        deadline, or a replay).
        """
        current = self._steps.get(site)
        if current is None or (current.round, current.step) != (round, step):
            return None
        pending = current.pending.pop(micro, None)
        if pending is None:
            return None
        h, out = pending
        amp = self._precision(site)
        amp.backward(out, to_device(grad, self.device).to(out.dtype))
        assert h.grad is not None
        head_grad = amp.unscaled(h.grad).cpu()
        self._accumulated(site, current, micro)
        return head_grad

    def evaluate(self, h: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        with torch.no_grad(), MixedPrecision(self.precision, self.device).autocast():
            out: torch.Tensor = self.module(to_device(h, self.device))
        return out.float().cpu()

    def forget(self, site: str) -> None:
        """The site's steps of this turn are void: drop its open step and put its share of the
        trunk back where the turn started."""
        self._steps.pop(site, None)
        start = self._turn_start.get(site)
        if start is not None:
            module, optimizer = self._for(site)
            module.load_state_dict(start[0])
            optimizer.load_state_dict(copy.deepcopy(start[1]))

    @property
    def open_steps(self) -> int:
        """Forward graphs held for a tail's gradient, over all sites."""
        return sum(len(current.pending) for current in self._steps.values())

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
