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
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


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


def mean_metrics(metrics: Mapping[str, Metrics]) -> dict[str, float | None]:
    """Each metric's plain mean over the sites that reported it (None when nobody did)."""
    out: dict[str, float | None] = {}
    for name in ("loss", "accuracy", "auroc"):
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


# With two replies the median is their mean, which a hostile one sets as much as the honest
# one: clipping to it, or taking a median, would cost an honest pair accuracy, protect nothing.
MEDIAN_CLIP_MIN_REPLIES = 3


@dataclass(frozen=True)
class Aggregation:
    """How replies become the next weights (``aggregation`` in job.yaml).

    The default bounds what one site can do without costing an honest federation accuracy:
    each update is scaled down to at most ``median_norm_clip`` x the round's median update
    norm, so that no update pulls harder than a typical one, then the updates' geometric median
    is taken, so that an update pointing the wrong way at a typical norm is outweighed rather
    than averaged in. The sample-weighted mean instead lets one hostile site cancel the honest
    ones' progress under label skew; the coordinate-wise median and trimmed mean collapse
    onto the majority's classes when sites hold different ones (docs/security.md has the
    measurements behind this choice)."""

    method: str = "geometric-median"  # mean | median | trimmed-mean | geometric-median
    trim_fraction: float = 0.2
    clip_norm: float | None = None
    median_norm_clip: float | None = 1.0

    def combine(
        self,
        current: Mapping[str, torch.Tensor],
        states: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
    ) -> dict[str, torch.Tensor]:
        if self.median_norm_clip is not None and len(states) >= MEDIAN_CLIP_MIN_REPLIES:
            limit = self.median_norm_clip * statistics.median(
                update_norm(current, state) for state in states
            )
            states = [clip_update(current, state, limit) for state in states]
        if self.clip_norm is not None:
            states = [clip_update(current, state, self.clip_norm) for state in states]
        if self.method == "mean" or len(states) < MEDIAN_CLIP_MIN_REPLIES:
            # With one or two replies a trimmed mean cuts nothing and a median is their
            # mean: FedAvg's weighted mean then, by sample count.
            return weighted_average(states, weights)
        if self.method == "median":
            return coordinate_wise(states, trim=None)
        if self.method == "geometric-median":
            return geometric_median(current, states)
        if self.method == "trimmed-mean":
            return coordinate_wise(states, trim=self.trim_fraction)
        raise ValueError(f"unknown aggregation method {self.method!r}")


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
        if reply.samples < 1:
            raise ValueError(f"site {reply.site} trained on {reply.samples} samples")
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


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Average state dicts weighted by ``weights`` (sample counts), key by key.

    Floating tensors are averaged in float64 and cast back; integer tensors (BatchNorm's
    ``num_batches_tracked``) take the maximum, since an average of counters means nothing.
    """
    if not states:
        raise ValueError("nothing to average")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must add up to a positive number")
    keys = states[0].keys()
    for index, state in enumerate(states[1:], start=1):
        if state.keys() != keys:
            raise ValueError(f"state {index} has other keys than state 0")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        first = states[0][key]
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for state, weight in zip(states, weights, strict=True):
                acc += state[key].to(torch.float64) * (weight / total)
            out[key] = acc.to(first.dtype)
        else:
            out[key] = torch.stack([state[key] for state in states]).max(0).values
    return out


def _deltas(
    current: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The update ``state - current`` of every floating tensor, in float64."""
    return {
        k: state[k].to(torch.float64) - current[k].to(torch.float64)
        for k in current
        if current[k].is_floating_point()
    }


def update_norm(current: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of ``state``'s update over the floating tensors."""
    return math.sqrt(sum(float(d.pow(2).sum()) for d in _deltas(current, state).values()))


def clip_update(
    current: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], max_norm: float
) -> dict[str, torch.Tensor]:
    """``state`` with its update (``state - current`` over the floating tensors) scaled down to
    an L2 norm of at most ``max_norm``; integer tensors are left as they are."""
    deltas = _deltas(current, state)
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas.values()))
    if norm <= max_norm:
        return dict(state)
    scale = max_norm / norm
    clipped = dict(state)
    for key, delta in deltas.items():
        clipped[key] = (current[key].to(torch.float64) + delta * scale).to(current[key].dtype)
    return clipped


def coordinate_wise(
    states: Sequence[Mapping[str, torch.Tensor]], *, trim: float | None
) -> dict[str, torch.Tensor]:
    """Each coordinate's median (``trim`` None) or trimmed mean over the states, unweighted:
    sample counts are what a poisoned site would inflate. With ``trim``, at least one state is
    cut at each end when there are three or more."""
    if not states:
        raise ValueError("nothing to aggregate")
    count = len(states)
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        stacked = torch.stack([state[key] for state in states])
        if not first.is_floating_point():
            out[key] = stacked.max(0).values
            continue
        ordered = stacked.to(torch.float64).sort(dim=0).values
        if trim is None:
            middle = ordered[(count - 1) // 2 : count // 2 + 1]
        else:
            cut = min(max(1 if count >= 3 else 0, math.floor(trim * count)), (count - 1) // 2)
            middle = ordered[cut : count - cut]
        out[key] = middle.mean(0).to(first.dtype)
    return out


def geometric_median(
    current: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    iterations: int = 200,
    smoothing: float = 1e-8,
    tolerance: float = 1e-7,
) -> dict[str, torch.Tensor]:
    """The geometric median of the updates (RFA, Pillutla et al., arXiv 1912.13445): the
    point that minimises the sum of distances to them, by Weiszfeld's iterations.

    Unlike a coordinate-wise median it moves the whole update at once: near the mean when the
    updates agree (and, unlike the coordinate-wise median, it does not collapse onto the
    majority's classes when sites hold different ones), and a minority far away (scaled,
    negated, noise) pulls on it with its count, not its distance. Unweighted: a sample count is
    what a hostile site would inflate (it declares its own at join). Integer tensors take the
    maximum, as in the mean."""
    floating = [k for k in current if current[k].is_floating_point()]
    points = torch.stack(
        [torch.cat([d.flatten() for d in _deltas(current, s).values()]) for s in states]
    )
    alphas = torch.full((len(states),), 1.0 / len(states), dtype=torch.float64)
    median = (alphas[:, None] * points).sum(0)  # not on a data point: Weiszfeld sticks there
    for _ in range(iterations):
        distances = (points - median).norm(dim=1).clamp_min(smoothing)
        betas = alphas / distances
        moved = (betas[:, None] * points).sum(0) / betas.sum()
        done = float((moved - median).norm()) <= tolerance * (1.0 + float(median.norm()))
        median = moved
        if done:
            break
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for key in current:
        if key in floating:
            size = current[key].numel()
            delta = median[offset : offset + size].view(current[key].shape)
            out[key] = (current[key].to(torch.float64) + delta).to(current[key].dtype)
            offset += size
        else:
            out[key] = torch.stack([s[key] for s in states]).max(0).values
    return out
