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
from medsplit.wire import Envelope


@dataclass(frozen=True)
class Answer:
    """A reply to a cut-layer message, and the tensor names it may down-cast."""

    envelope: Envelope
    cast: frozenset[str]


class TrunkService:
    def __init__(self, trunk: Trunk, *, labels_travel: bool) -> None:
        self.trunk = trunk
        self.labels_travel = labels_travel  # vanilla split: the trunk ends in the loss

    def activations(self, site: str, env: Envelope) -> Answer:
        """A training step's activations: the gradient (vanilla split, with the loss) or the
        trunk's output (U-shaped)."""
        if self.labels_travel:
            grad, loss = self.trunk.split_step(site, env.tensors["h"], env.tensors["y"])
            meta = {"loss": loss if math.isfinite(loss) else None}
            reply = env.reply(AGGREGATOR_ID, Kind.GRADIENTS, tensors={"g": grad}, meta=meta)
            return Answer(reply, frozenset({"g"}))
        out = self.trunk.forward(site, env.round, env.step, env.tensors["h"])
        return Answer(
            env.reply(AGGREGATOR_ID, Kind.TRUNK_OUT, tensors={"t": out}), frozenset({"t"})
        )

    def trunk_grad(self, site: str, env: Envelope) -> Answer | None:
        """The tail's gradient for the trunk's output: the gradient for the activations."""
        grad = self.trunk.backward(site, env.round, env.step, env.tensors["g"])
        if grad is None:
            return None
        return Answer(
            env.reply(AGGREGATOR_ID, Kind.ACT_GRAD, tensors={"g": grad}), frozenset({"g"})
        )

    def evaluation(self, env: Envelope) -> Answer:
        """Held-out activations: the trunk's output, nothing learned."""
        out = self.trunk.evaluate(env.tensors["h"])
        return Answer(env.reply(AGGREGATOR_ID, Kind.EVAL_OUT, tensors={"t": out}), frozenset({"t"}))
