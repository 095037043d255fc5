"""Strategies: pure objects that carry the whole contract of a round, as Flower's do.

A round has training *turns* and then one evaluation. For each turn the strategy says who
trains (``configure_train``); with the replies and the failures of the turn it says what the
global weights become (``aggregate_train``); then it says who evaluates
(``configure_evaluate``) and what the round's evaluation amounts to (``aggregate_evaluate``).
A strategy never touches the network and keeps no state between calls: the job's ``JobState``
holds everything, so a checkpointed job resumes with the same strategy object.

* ``FedAvg`` (McMahan et al., 2017): one turn; the weighted mean of every exchanged tensor,
  weights being each site's sample count; a fraction of the sites may be sampled per round.
  SplitFed averages the sites' heads (and tails) with it.
* ``Flop`` (Yang et al., arXiv 2102.05218): the same mean over the plan's *shared* tensors only.
  It refuses a reply that carries a private tensor: private layers must never reach the server.
* ``Aggregation`` says how ``FedAvg`` and ``Flop`` combine replies. By default, to bound what
  one poisoned site can do, each update is clipped to the round's median update norm (Sun et
  al., arXiv 1911.07963, with the bound taken from the round itself) and the geometric median
  of the updates is taken (RFA, Pillutla et al., arXiv 1912.13445); the weighted mean, the
  coordinate-wise median or trimmed mean (Yin et al., ICML 2018) can replace it.
* ``Cyclic`` (Poirot et al., arXiv 1912.12115; cyclic weight transfer): one turn per site, in
  the job's order; each site starts from the weights the previous one handed on. It wraps
  ``FedAvg`` or ``Flop`` for the checks of what a site may send.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from medsplit.aggregation import Aggregation
from medsplit.evaluation import NAMES as CLINICAL


@dataclass(frozen=True)
class Reply:
    """What one site sent back after training: its weights and how many samples it used."""

    site: str
    state: Mapping[str, torch.Tensor]
    samples: int


Metrics = Mapping[str, Any]


class Strategy(Protocol):
    def configure_train(self, round: int, turn: int, sites: Sequence[str]) -> list[str]:
        """The sites asked to train in ``turn`` of ``round``; none means training is over."""
        ...

    def check_reply(self, current: Mapping[str, torch.Tensor], reply: Reply) -> None:
        """Raise ``ValueError`` if the reply cannot be used (wrong tensors, no samples)."""
        ...

    def aggregate_train(
        self,
        current: Mapping[str, torch.Tensor],
        replies: Sequence[Reply],
        failures: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """The global weights after a turn, from its replies; ``failures`` did not answer."""
        ...

    def configure_evaluate(self, round: int, sites: Sequence[str]) -> list[str]:
        """The sites asked to evaluate the round's weights."""
        ...

    def aggregate_evaluate(
        self, metrics: Mapping[str, Metrics], failures: Sequence[str]
    ) -> dict[str, float | None]:
        """The round's summary: the mean of each metric over the sites that answered."""
        ...


def check_samples(reply: Reply) -> None:
    """An update must come from training on something."""
    if reply.samples < 1:
        raise ValueError(f"site {reply.site} trained on {reply.samples} samples")


def mean_metrics(metrics: Mapping[str, Metrics]) -> dict[str, float | None]:
    """Each metric's plain mean over the sites that reported it (None when nobody did)."""
    out: dict[str, float | None] = {}
    for name in ("loss", "accuracy", "auroc", *CLINICAL):
        values = [float(m[name]) for m in metrics.values() if m.get(name) is not None]
        out[name] = sum(values) / len(values) if values else None
    return out


class EvaluateEverySite:
    """The evaluation half of the contract most strategies share: every present site
    evaluates, and the round's summary is the plain mean over those that answered."""

    def configure_evaluate(self, round: int, sites: Sequence[str]) -> list[str]:
        return list(sites)

    def aggregate_evaluate(
        self, metrics: Mapping[str, Metrics], failures: Sequence[str] = ()
    ) -> dict[str, float | None]:
        return mean_metrics(metrics)


@dataclass(frozen=True)
class FedAvg(EvaluateEverySite):
    """Sample-weighted averaging of every exchanged tensor.

    ``fraction`` of the present sites train each round (at least ``min_sites``), drawn with a
    generator seeded by (``seed``, round): the same job samples the same sites every time.
    """

    fraction: float = 1.0
    min_sites: int = 1
    seed: int = 0
    aggregation: Aggregation = field(default_factory=Aggregation)

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_sites < 1:
            raise ValueError(f"min_sites must be at least 1, got {self.min_sites}")

    def configure_train(self, round: int, turn: int, sites: Sequence[str]) -> list[str]:
        if turn > 0:
            return []  # one parallel turn per round
        wanted = max(self.min_sites, math.ceil(self.fraction * len(sites)))
        if wanted >= len(sites):
            return list(sites)
        chosen = set(random.Random(self.seed * 1_000_003 + round).sample(sorted(sites), wanted))
        return [site for site in sites if site in chosen]

    def aggregate_train(
        self,
        current: Mapping[str, torch.Tensor],
        replies: Sequence[Reply],
        failures: Sequence[str] = (),
    ) -> dict[str, torch.Tensor]:
        if not replies:  # nobody answered: the weights stay; the job decides about quorum
            return dict(current)
        for reply in replies:
            self.check_reply(current, reply)
        states = [r.state for r in replies]
        return self.aggregation.combine(current, states, [float(r.samples) for r in replies])

    def check_reply(self, current: Mapping[str, torch.Tensor], reply: Reply) -> None:
        check_samples(reply)
        if reply.state.keys() != current.keys():
            missing = sorted(current.keys() - reply.state.keys())
            extra = sorted(reply.state.keys() - current.keys())
            raise ValueError(
                f"site {reply.site} sent other tensors than the round's: missing {missing[:3]}, unexpected {extra[:3]}"
            )


@dataclass(frozen=True)
class Flop(FedAvg):
    """FedAvg restricted to the shared tensors; private ones stay on their site."""

    private_keys: frozenset[str] = field(default_factory=frozenset)

    def check_reply(self, current: Mapping[str, torch.Tensor], reply: Reply) -> None:
        leaked = sorted(self.private_keys & reply.state.keys())
        if leaked:
            raise ValueError(f"site {reply.site} sent private tensors {leaked[:3]}; refused")
        overlap = sorted(self.private_keys & current.keys())
        if overlap:
            raise ValueError(f"the global state must not hold private tensors {overlap[:3]}")
        super().check_reply(current, reply)


@dataclass(frozen=True)
class Cyclic(EvaluateEverySite):
    """Sites take turns within a round; each hands its weights on to the next."""

    base: FedAvg = field(default_factory=FedAvg)

    def configure_train(self, round: int, turn: int, sites: Sequence[str]) -> list[str]:
        return [sites[turn]] if turn < len(sites) else []

    def check_reply(self, current: Mapping[str, torch.Tensor], reply: Reply) -> None:
        self.base.check_reply(current, reply)

    def aggregate_train(
        self,
        current: Mapping[str, torch.Tensor],
        replies: Sequence[Reply],
        failures: Sequence[str] = (),
    ) -> dict[str, torch.Tensor]:
        if not replies:  # the site missed its turn: the next one starts where it would have
            return dict(current)
        (reply,) = replies
        self.check_reply(current, reply)
        return {k: reply.state[k] for k in current}


@dataclass(frozen=True)
class Together(EvaluateEverySite):
    """Vertical jobs: every party takes part in every round, once. A party's layers never
    leave it, so there is nothing to combine: the trunk's update is the aggregator's own."""

    def configure_train(self, round: int, turn: int, sites: Sequence[str]) -> list[str]:
        return list(sites) if turn == 0 else []

    def check_reply(self, current: Mapping[str, torch.Tensor], reply: Reply) -> None:
        if reply.state:
            raise ValueError(
                f"site {reply.site} sent tensors {sorted(reply.state)[:3]}; a vertical party's "
                "layers never leave it"
            )
        check_samples(reply)

    def aggregate_train(
        self,
        current: Mapping[str, torch.Tensor],
        replies: Sequence[Reply],
        failures: Sequence[str] = (),
    ) -> dict[str, torch.Tensor]:
        for reply in replies:
            self.check_reply(current, reply)
        return dict(current)
