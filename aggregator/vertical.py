"""The trunk of a vertical job: every party's activations of one step, merged, then the top.

In horizontal split learning each site's step is its own round trip. In a vertical job the
parties hold different columns of the same patients, so a step needs every party's activations
for the same rows: this service gathers them (a barrier per step), merges them in party order
(``models.vertical.merge_activations``, as the joined model does), and runs the trunk.

* **Top at the label party** (the plan has a tail; labels never leave it): the trunk's output
  answers the label party's activations; its gradient, when the label party sends it, is
  backpropagated, the trunk steps, and every party gets the gradient of its own slice -- the
  label party as the answer to its gradient, the others as the answer to their activations.
* **Top at the aggregator** (no tail): the label party's activations carry the labels; once
  every party's are in, the loss is computed here and every party gets its slice's gradient --
  a party without labels with the job's gradient noise added here (``defenses.gradient_noise``,
  on by default), since these gradients carry the labels as the U-shaped ones do.

A party's answer is held until the step completes, so a party never runs ahead: a step's
answers are the barrier. When a party restarts, the round starts over for every party (each
from its own snapshot of the round's start, the trunk from where the round started); the
coordinator passes on only steps that serve the request open with their party, so a step of
the attempt given up can never complete a step of the redone one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from aggregator.alignment import Script, alignment_script
from aggregator.config import JobConfig
from aggregator.trunk import Trunk
from aggregator.trunk_service import Answer
from medsplit.config import DefenseSettings
from medsplit.devices import to_device
from medsplit.ids import AGGREGATOR_ID
from medsplit.modes import Mode
from medsplit.precision import MixedPrecision
from medsplit.privacy.defenses import SiteDefenses
from medsplit.protocol import Kind
from medsplit.training import entry, loss_fn
from medsplit.wire import Envelope
from models.vertical import Merge, merge_activations, vertical_args

Answers = list[tuple[str, Answer]]


@dataclass
class _Gathering:
    """One step's (or held-out batch's) requests from the parties, until all are in."""

    round: int
    step: int
    requests: dict[str, Envelope] = field(default_factory=dict)
    # U-shaped: the parties' activations as leaves, and the trunk's output, awaiting its gradient.
    leaves: list[torch.Tensor] = field(default_factory=list)
    out: torch.Tensor | None = None


class VerticalTrunk:
    """Answers to a vertical job's cut-layer messages (see the module docstring)."""

    def __init__(
        self,
        trunk: Trunk,
        parties: tuple[str, ...],
        label_party: str,
        merge: Merge,
        *,
        labels_travel: bool,
        defenses: DefenseSettings,
    ) -> None:
        """``defenses``: the job's; with the top here, its ``gradient_noise`` is added to the
        gradients returned to the parties without labels."""
        self.trunk = trunk
        self.parties = parties
        self.label_party = label_party
        self.merge = merge
        self.labels_travel = labels_travel
        self.amp = MixedPrecision(trunk.precision, trunk.device)
        self._training: _Gathering | None = None
        self._held_out: _Gathering | None = None
        noise = labels_travel and defenses.label_noise  # U-shaped: the label party's to add
        self._noise = SiteDefenses(defenses) if noise else None

    # -- training ----------------------------------------------------------------------------------

    def activations(self, site: str, env: Envelope) -> Answers:
        """A party's activations for a step; once every party's are in, the step goes on."""
        gathering = self._gather("_training", site, env)
        if len(gathering.requests) < len(self.parties):
            return []
        if self.labels_travel:
            return self._step_with_loss(gathering)
        return self._forward(gathering)

    def trunk_grad(self, site: str, env: Envelope) -> Answers | None:
        """The label party's gradient for the trunk's output; None when it belongs to no open
        step (a replay, or a step dropped after a restart)."""
        open_step = self._training
        if (
            site != self.label_party
            or open_step is None
            or open_step.out is None
            or (open_step.round, open_step.step) != (env.round, env.step)
        ):
            return None
        self._training = None
        out = open_step.out
        self.amp.backward(out, to_device(env.tensors["g"], self.trunk.device).to(out.dtype))
        self.amp.step(self.trunk.optimizer)
        answers: Answers = []
        for party, leaf in zip(self.parties, open_step.leaves, strict=True):
            assert leaf.grad is not None
            grad = self.amp.unscaled(leaf.grad).cpu()
            if party == self.label_party:
                reply = env.reply(AGGREGATOR_ID, Kind.ACT_GRAD, tensors={"g": grad})
            else:
                reply = open_step.requests[party].reply(
                    AGGREGATOR_ID, Kind.GRADIENTS, tensors={"g": grad}
                )
            answers.append((party, Answer(reply, frozenset({"g"}))))
        return answers

    def _gather(self, slot: str, site: str, env: Envelope) -> _Gathering:
        if site not in self.parties:
            raise ValueError(f"{site} is not a party of this vertical job")
        gathering: _Gathering | None = getattr(self, slot)
        if gathering is None or (gathering.round, gathering.step) != (env.round, env.step):
            gathering = _Gathering(env.round, env.step)  # a new step replaces an unfinished one
            setattr(self, slot, gathering)
        gathering.requests[site] = env
        return gathering

    def _leaves(self, gathering: _Gathering) -> list[torch.Tensor]:
        return [
            to_device(gathering.requests[p].tensors["h"], self.trunk.device)
            .detach()
            .requires_grad_()
            for p in self.parties
        ]

    def _forward(self, gathering: _Gathering) -> Answers:
        """U-shaped: the trunk's output to the label party; the graph waits for its gradient."""
        self.trunk.optimizer.zero_grad()
        self.trunk.module.train()
        gathering.leaves = self._leaves(gathering)
        with self.amp.autocast():
            gathering.out = self.trunk.module(
                entry(merge_activations(gathering.leaves, self.merge))
            )
        assert gathering.out is not None
        t = gathering.out.detach().float().cpu()
        request = gathering.requests[self.label_party]
        reply = request.reply(AGGREGATOR_ID, Kind.TRUNK_OUT, tensors={"t": t})
        return [(self.label_party, Answer(reply, frozenset({"t"})))]

    def _step_with_loss(self, gathering: _Gathering) -> Answers:
        """Top at the aggregator: forward, the loss with the label party's labels, backward,
        the update; every party's slice of the gradient."""
        self._training = None
        self.trunk.optimizer.zero_grad()
        self.trunk.module.train()
        leaves = self._leaves(gathering)
        labels = to_device(gathering.requests[self.label_party].tensors["y"], self.trunk.device)
        with self.amp.autocast():
            logits = self.trunk.module(entry(merge_activations(leaves, self.merge)))
            loss = loss_fn(logits, labels, self.trunk.class_weights)
        self.amp.backward(loss)
        self.amp.step(self.trunk.optimizer)
        value = float(loss.detach())
        answers: Answers = []
        for party, leaf in zip(self.parties, leaves, strict=True):
            assert leaf.grad is not None
            meta = {"loss": value if math.isfinite(value) else None}
            reply = gathering.requests[party].reply(
                AGGREGATOR_ID,
                Kind.GRADIENTS,
                tensors={"g": self._returned(party, self.amp.unscaled(leaf.grad).cpu())},
                meta=meta if party == self.label_party else {},
            )
            answers.append((party, Answer(reply, frozenset({"g"}))))
        return answers

    def _returned(self, party: str, grad: torch.Tensor) -> torch.Tensor:
        """A party's slice of the gradient as it is sent: a party without labels gets it with
        the job's gradient noise, which blurs what the norm and cosine attacks read of the
        labels (the label party's own slice tells it nothing it does not hold)."""
        if self._noise is None or party == self.label_party:
            return grad
        return self._noise.gradient(grad)

    # -- held-out data -------------------------------------------------------------------------------

    def evaluation(self, site: str, env: Envelope) -> Answers:
        """A held-out batch's activations; once every party's are in, the trunk's output goes
        to the label party (the others get an empty answer: they hold no labels to score)."""
        gathering = self._gather("_held_out", site, env)
        if len(gathering.requests) < len(self.parties):
            return []
        self._held_out = None
        merged = merge_activations(
            [gathering.requests[p].tensors["h"] for p in self.parties], self.merge
        )
        out = self.trunk.evaluate(merged)
        answers: Answers = []
        for party, request in gathering.requests.items():
            t = out if party == self.label_party else out[:0]
            reply = request.reply(AGGREGATOR_ID, Kind.EVAL_OUT, tensors={"t": t})
            answers.append((party, Answer(reply, frozenset({"t"}))))
        return answers

    def alignment(self) -> Script:
        """The stages of the parties' private set intersection, before training."""
        return alignment_script(self.parties, self.label_party)

    def forget(self) -> None:
        """A new round, or one that starts over: every party from its first step, nothing of
        an unfinished step kept."""
        self._training = self._held_out = None
        self.trunk.optimizer.zero_grad()


def vertical_trunk(config: JobConfig, trunk: Trunk) -> VerticalTrunk | None:
    """The vertical service over ``trunk`` for a vertical job; None for any other."""
    if config.mode != Mode.VERTICAL:
        return None
    args = vertical_args(config.plan.model.args)
    return VerticalTrunk(
        trunk,
        tuple(args.parties),
        args.label_party,
        args.merge,
        labels_travel=not config.plan.u_shaped,
        defenses=config.defenses,
    )


def vertical_summary(config: JobConfig, common_patients: int | None) -> dict[str, object] | None:
    """What ``/status`` and the report say of a vertical job: its parties, who holds the
    labels and the top, the merge, and how many patients the alignment found common."""
    if config.mode != Mode.VERTICAL:
        return None
    args = vertical_args(config.plan.model.args)
    return {
        "parties": list(args.parties),
        "label_party": args.label_party,
        "top": "label party" if config.plan.u_shaped else "aggregator",
        "merge": args.merge,
        "common_patients": common_patients,
    }
