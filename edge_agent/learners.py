"""Learners: what a site computes in a round, one per family of modes.

The agent (``edge_agent.agent``) keeps the lifecycle and the channel; a learner owns a mode
family's layers, its training step, its exchanges and its state:

* ``FederatedLearner`` (``fedavg``, ``flop``): the whole model, trained locally; nothing
  leaves the site until the round is done.
* ``SplitLearner`` (``split``, ``split-u``): the head (and tail), trained step by step with the
  aggregator's trunk, each step a round trip of cut-layer tensors through a ``StepChannel``.

Both load the weights a request carries (``load``), train a round (``train_round``), say what
goes back (``state``) and compute held-out logits (``logits``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from edge_agent.data.site_data import SiteData
from edge_agent.local_model import LocalModel
from edge_agent.recovery import Recovery, Snapshot
from edge_agent.segments import EdgeSegments
from medsplit.devices import to_device
from medsplit.modes import Mode
from medsplit.privacy.defenses import SiteDefenses
from medsplit.protocol import JobSpec, Kind
from medsplit.training import (
    batch_order,
    entry,
    loss_fn,
    loss_shares,
    micro_batches,
    train_epochs,
)
from medsplit.wire import Envelope
from medsplit.wire.frame import MetaValue
from models import cut_shapes
from models.vertical import vertical_args


class StepChannel(Protocol):
    """How a split learner reaches the trunk: requests in flight and their answers (the agent
    repeats a request while no answer comes, and gives up when the aggregator goes away)."""

    def ask(
        self,
        kind: str,
        tensors: dict[str, torch.Tensor],
        answer: str,
        *,
        round: int,
        step: int,
        cast: set[str],
        meta: Mapping[str, MetaValue] | None = None,
        wait: bool = False,
    ) -> Envelope: ...

    def answer_to(self, request: Envelope) -> Envelope: ...


@dataclass
class Progress:
    """What this agent has done, for its round log line and its /metrics."""

    rounds_trained: int = 0
    steps: int = 0  # training batches (split: cut-layer round trips)
    compute_seconds: float = 0.0  # local training time, waiting for the aggregator included
    last_train_loss: float | None = None
    exchange_seconds: float = 0.0  # split: in cut-layer exchanges (send, wait, receive)


@dataclass
class RoundResult:
    """A trained round: its mean loss, the steps it took and what its ``done`` reports."""

    loss: float
    steps: int
    meta: dict[str, MetaValue] = field(default_factory=dict)


class FederatedLearner:
    """The whole model on the site; a round is local epochs with a fresh optimizer."""

    def __init__(self, spec: JobSpec, device: torch.device, progress: Progress) -> None:
        self.spec, self.device = spec, device
        self.progress = progress
        self.segments = LocalModel(spec, device)

    def train_round(self, data: SiteData, round: int, epochs: int) -> RoundResult:
        model = self.segments
        losses = train_epochs(
            model.model,
            model.optimizer,
            data.x_train.to(self.device),
            data.y_train.to(self.device),
            epochs=epochs,
            batch_size=self.spec.batch_size,
            seed=self.spec.seed,
            first_epoch=round * epochs,
            amp=model.amp,
            class_weights=data.class_weights,
        )
        steps = -(-data.train_samples // self.spec.batch_size) * epochs
        self.progress.steps += steps
        return RoundResult(sum(losses) / len(losses), steps)

    def logits(self, round: int, x: torch.Tensor) -> torch.Tensor:
        return self.segments.predict(x)


class SplitLearner:
    """The site's head (and tail); each batch a round trip through the aggregator's trunk."""

    def __init__(
        self,
        spec: JobSpec,
        device: torch.device,
        *,
        defenses: SiteDefenses,
        channel: StepChannel,
        recovery: Recovery,
        progress: Progress,
        party: str | None = None,
    ) -> None:
        """``party``: this site, in a vertical job (its own head; labels only at the label
        party)."""
        self.spec, self.device = spec, device
        self.defenses = defenses
        self.channel = channel
        self.recovery = recovery
        self.progress = progress  # counted as it goes: /metrics shows a round in progress
        self.segments = EdgeSegments(spec, device, party)
        # A vertical party other than the label party holds no labels: it sends activations
        # and gets their gradient, nothing else.
        self.holds_labels = spec.mode != Mode.VERTICAL or (
            party == vertical_args(spec.plan.model.args).label_party
        )
        self.initial = self.segments.state()  # the job's first turn starts from these
        self._sent_labels: torch.Tensor | None = None
        self.class_weights: torch.Tensor | None = None  # the job's, once normalised

    def train_round(
        self,
        data: SiteData,
        round: int,
        epochs: int,
        *,
        every: int = 0,
        resumed: Snapshot | None = None,
    ) -> RoundResult:
        """Local epochs of split learning, in the same batch order as centralized training.

        With ``every``, the site's state is kept before every ``every``-th step (the aggregator
        checkpoints at the same steps); from ``resumed`` it goes on at that step.
        """
        x, y = data.x_train, data.y_train
        self.class_weights = data.class_weights
        sent_labels = self._labels_to_send(y)
        step, total_loss, seen, taken = 0, 0.0, 0, 0
        first = 0
        if resumed is not None:
            first, total_loss, seen = resumed.step, resumed.loss_sum, resumed.seen
        for local_epoch in range(epochs):
            epoch = round * epochs + local_epoch
            for idx in batch_order(len(y), self.spec.batch_size, seed=self.spec.seed, epoch=epoch):
                if step < first:
                    step += 1
                    continue
                if every and step and step % every == 0 and step != first:
                    self.recovery.keep_step(self.segments, round, step, total_loss, seen)
                xb, yb = x[idx].to(self.device), y[idx].to(self.device)
                total_loss += self.step(round, step, xb, yb, sent_labels[idx]) * len(idx)
                seen += len(idx)
                step += 1
                taken += 1
                self.progress.steps += 1
        return RoundResult(total_loss / max(seen, 1), taken)

    def _labels_to_send(self, y: torch.Tensor) -> torch.Tensor:
        """Vanilla split sends labels: as they are, or drawn once per job by randomised
        response (``label_epsilon``), so that repeating them across epochs spends nothing."""
        if self._sent_labels is None or len(self._sent_labels) != len(y):
            classes = cut_shapes(self.spec.plan, 1)["logits"][-1]
            self._sent_labels = self.defenses.labels(y, classes)
        return self._sent_labels

    def step(
        self,
        round: int,
        step: int,
        xb: torch.Tensor,
        yb: torch.Tensor,
        sent_labels: torch.Tensor | None = None,
    ) -> float:
        """One split-learning step: the cut-layer tensors make a round trip per batch -- or,
        pipelined (``micro_batches``), per micro-batch, all in flight at once, so the trunk
        works on one while this site works on another; gradients accumulate and every party
        steps once. ``sent_labels``: what vanilla split sends for ``yb`` (default: ``yb``)."""
        self.segments.optimizer.zero_grad()
        parts = micro_batches(len(yb), self.spec.micro_batches)
        if not self.holds_labels:
            loss = self._features_step(round, step, xb)
        elif self.segments.tail is None:  # vanilla split: labels travel, the trunk has the loss
            labels = yb if sent_labels is None else sent_labels.to(self.device)
            loss = self._vanilla_step(round, step, xb, labels, parts)
        else:
            loss = self._u_step(round, step, xb, yb, parts)
        self.segments.amp.step(self.segments.optimizer)
        return loss

    def _vanilla_step(
        self, round: int, step: int, xb: torch.Tensor, labels: torch.Tensor, parts: list[slice]
    ) -> float:
        """Each micro-batch's activations and labels up; its gradient (and loss) back."""
        shares = loss_shares(labels, parts, self.class_weights)
        heads, asked = [], []
        for micro, part in enumerate(parts):
            h = self._head(xb[part])
            tensors = {"h": self.defenses.activations(h), "y": labels[part]}
            place = _place(micro, len(parts), shares[micro], with_share=True)
            asked.append(self._ask(Kind.ACTIVATIONS, tensors, Kind.GRADIENTS, round, step, place))
            heads.append(h)
        loss, grads = 0.0, []
        for micro, request in enumerate(asked):
            reply = self._answer(request)
            loss += shares[micro] * float(reply.meta.get("loss") or 0.0)
            grads.append(self._scaled(reply.tensors["g"]))
            self._backward_head(xb, parts, heads, grads)
        return loss

    def _features_step(self, round: int, step: int, xb: torch.Tensor) -> float:
        """A vertical party without labels: its activations up, their gradient down, once
        every party's are in. It knows no loss (NaN: reported as none)."""
        h = self._head(xb)
        request = self._ask(
            Kind.ACTIVATIONS, {"h": self.defenses.activations(h)}, Kind.GRADIENTS, round, step, {}
        )
        grads = [self._scaled(self._answer(request).tensors["g"])]
        self._backward_head(xb, [slice(0, len(xb))], [h], grads)
        return math.nan

    def _u_step(
        self, round: int, step: int, xb: torch.Tensor, yb: torch.Tensor, parts: list[slice]
    ) -> float:
        """Each micro-batch's activations up, the trunk's output down; the tail's loss and
        the trunk output's gradient up, the activations' gradient down."""
        seg, amp = self.segments, self.segments.amp
        assert seg.tail is not None
        shares = loss_shares(yb, parts, self.class_weights)
        heads, asked = [], []
        for micro, part in enumerate(parts):
            h = self._head(xb[part])
            sent = {"h": self.defenses.activations(h)}
            place = _place(micro, len(parts), shares[micro])
            asked.append(self._ask(Kind.ACTIVATIONS, sent, Kind.TRUNK_OUT, round, step, place))
            heads.append(h)
        loss, returned = 0.0, []
        for micro, part in enumerate(parts):
            t = to_device(self._answer(asked[micro]).tensors["t"], self.device).requires_grad_()
            with amp.autocast():
                micro_loss = loss_fn(seg.tail(entry(t)), yb[part], self.class_weights)
            share = shares[micro]
            amp.backward(micro_loss * share)  # times 1.0 unpipelined: exact
            loss += share * float(micro_loss.detach())
            assert t.grad is not None
            grad = {"g": self.defenses.gradient(amp.unscaled(t.grad))}
            place = _place(micro, len(parts), share)
            returned.append(self._ask(Kind.TRUNK_GRAD, grad, Kind.ACT_GRAD, round, step, place))
        grads: list[torch.Tensor] = []
        for request in returned:
            grads.append(self._scaled(self._answer(request).tensors["g"]))
            self._backward_head(xb, parts, heads, grads)
        return loss

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        with self.segments.amp.autocast():
            h: torch.Tensor = self.segments.head(x)
        return h.float()  # the cut travels in float32 (or the job's wire_dtype)

    def _scaled(self, grad: torch.Tensor) -> torch.Tensor:
        """The aggregator's (unscaled) gradient, scaled for this site's fp16 backward."""
        return to_device(grad, self.device) * self.segments.amp.scale

    def _backward_head(
        self,
        xb: torch.Tensor,
        parts: list[slice],
        heads: list[torch.Tensor],
        grads: list[torch.Tensor],
    ) -> None:
        """The newest micro-batch's gradient into the head as it comes -- or, with NoPeek,
        whose penalty is the whole batch's, every micro-batch's once the last one came."""
        micro = len(grads) - 1
        if not self.defenses.whole_batch_backward:
            self.defenses.backward_head(xb[parts[micro]], [heads[micro]], [grads[micro]])
        elif micro == len(parts) - 1:
            self.defenses.backward_head(xb, heads, grads)

    def _ask(  # noqa: PLR0917
        self,
        kind: str,
        tensors: dict[str, torch.Tensor],
        answer: str,
        round: int,
        step: int,
        place: dict[str, MetaValue],
    ) -> Envelope:
        """A cut-layer request up. Only the cut-layer tensor (``h`` or ``g``) may travel in
        the job's wire dtype; labels never do."""
        started = time.perf_counter()
        cast = {"h"} if "h" in tensors else {"g"}
        request = self.channel.ask(
            kind, tensors, answer, round=round, step=step, cast=cast, meta=place
        )
        self.progress.exchange_seconds += time.perf_counter() - started
        return request

    def _answer(self, request: Envelope) -> Envelope:
        started = time.perf_counter()
        reply = self.channel.answer_to(request)
        self.progress.exchange_seconds += time.perf_counter() - started
        return reply

    def logits(self, round: int, x: torch.Tensor) -> torch.Tensor:
        """Held-out logits through the aggregator's trunk; labels never travel."""
        seg = self.segments
        outputs = []
        with torch.no_grad(), seg.amp.autocast():
            for step, idx in enumerate(torch.arange(len(x)).split(max(self.spec.batch_size, 256))):
                h = self.defenses.activations(seg.head(x[idx]).float())
                request = self.channel.ask(
                    Kind.EVAL_ACTIVATIONS,
                    {"h": h},
                    Kind.EVAL_OUT,
                    round=round,
                    step=step,
                    cast={"h"},
                    wait=True,
                )
                reply = self.channel.answer_to(request)
                t = to_device(reply.tensors["t"], self.device)
                outputs.append((seg.tail(t) if seg.tail is not None else t).float())
        return torch.cat(outputs)


def _place(
    micro: int, micros: int, share: float, *, with_share: bool = False
) -> dict[str, MetaValue]:
    """Where a cut-layer message stands in a pipelined step (``StepMeta``); nothing for a step
    of one batch, whose messages are then what they always were. Vanilla split's activations
    also carry the share of the batch's loss the trunk weighs the micro-batch's by."""
    if micros == 1:
        return {}
    place: dict[str, MetaValue] = {"micro": micro, "micros": micros}
    if with_share:
        place["share"] = share
    return place


Learner = FederatedLearner | SplitLearner
