"""The trunk's answers to a site's cut-layer messages, apart from the job loop.

The coordinator decides *whether* a cut-layer message may touch the trunk (the site was asked,
in this round; ``Coordinator._asked``) and checkpoints at the configured steps; this module
decides *what* the answer is: the trunk's output or gradient, as the reply envelope, with the
tensor that may travel in the job's wire dtype. ``None`` means there is nothing to answer (a
gradient for a step that is not the site's open one: forgotten after a restart, or a replay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aggregator.trunk import Trunk
from medsplit.ids import AGGREGATOR_ID
from medsplit.protocol import Kind
from medsplit.protocol.meta import StepMeta, read_meta
from medsplit.wire import Envelope


@dataclass(frozen=True)
class Answer:
    """A reply to a cut-layer message, and the tensor names it may down-cast."""

    envelope: Envelope
    cast: frozenset[str]


class TrunkService:
    def __init__(self, trunk: Trunk, *, labels_travel: bool, micro_batches: int = 1) -> None:
        self.trunk = trunk
        self.labels_travel = labels_travel  # vanilla split: the trunk ends in the loss
        self.micro_batches = micro_batches  # the job's: a step is cut into at most this many

    def _place(self, env: Envelope) -> StepMeta:
        """Where ``env`` stands in its step; a step cut finer than the job's
        ``training.micro_batches`` is refused, so a site cannot make the trunk hold more."""
        place = read_meta(StepMeta, env)
        if place.micros > self.micro_batches:
            raise ValueError(
                f"a step of {place.micros} micro-batches; the job's training.micro_batches is "
                f"{self.micro_batches}"
            )
        return place

    def activations(self, site: str, env: Envelope) -> Answer:
        """A training step's activations: the gradient (vanilla split, with the loss) or the
        trunk's output (U-shaped)."""
        place = self._place(env)
        at = (site, env.round, env.step)
        if self.labels_travel:
            grad, loss = self.trunk.split_step(
                *at, env.tensors["h"], env.tensors["y"], place.micro, place.micros, place.share
            )
            meta = {"loss": loss if math.isfinite(loss) else None}
            reply = env.reply(AGGREGATOR_ID, Kind.GRADIENTS, tensors={"g": grad}, meta=meta)
            return Answer(reply, frozenset({"g"}))
        out = self.trunk.forward(*at, env.tensors["h"], place.micro, place.micros)
        return Answer(
            env.reply(AGGREGATOR_ID, Kind.TRUNK_OUT, tensors={"t": out}), frozenset({"t"})
        )

    def trunk_grad(self, site: str, env: Envelope) -> Answer | None:
        """The tail's gradient for the trunk's output: the gradient for the activations."""
        place = self._place(env)
        grad = self.trunk.backward(site, env.round, env.step, env.tensors["g"], place.micro)
        if grad is None:
            return None
        return Answer(
            env.reply(AGGREGATOR_ID, Kind.ACT_GRAD, tensors={"g": grad}), frozenset({"g"})
        )

    def evaluation(self, env: Envelope) -> Answer:
        """Held-out activations: the trunk's output, nothing learned."""
        out = self.trunk.evaluate(env.tensors["h"])
        return Answer(env.reply(AGGREGATOR_ID, Kind.EVAL_OUT, tensors={"t": out}), frozenset({"t"}))
