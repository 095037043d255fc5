"""Combining several sites' versions of the same tensors into one.

The aggregator combines federated updates with it, and in sealed parallel split rounds every
site combines its peers' head and tail itself (``edge_agent.sealing``): both sides run this one
function on the same inputs in the same order, so the sealed and unsealed runs agree to the bit.

By default, to bound what one poisoned site can do, each update is clipped to the round's median
update norm (Sun et al., arXiv 1911.07963, with the bound taken from the round itself) and the
geometric median of the updates is taken (RFA, Pillutla et al., arXiv 1912.13445); the weighted
mean, the coordinate-wise median or trimmed mean (Yin et al., ICML 2018) can replace it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

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
