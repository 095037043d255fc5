"""Federated strategies: pure objects that configure a round and aggregate its replies.

A strategy never touches the network: the coordinator asks it which sites train this round and
hands it the weights that came back. That keeps the maths testable on its own and lets one
coordinator run ``fedavg``, ``flop`` and SplitFed's head/tail averaging alike.

* ``FedAvg`` (McMahan et al., 2017): the weighted mean of every exchanged tensor, weights being
  each site's sample count; a fraction of the sites may be sampled per round.
* ``Flop`` (Yang et al., arXiv 2102.05218): the same mean over the plan's *shared* tensors only.
  It refuses a reply that carries a private tensor: private layers must never reach the server.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class Reply:
    """What one site sent back after training: its weights and how many samples it used."""

    site: str
    state: Mapping[str, torch.Tensor]
    samples: int


class Strategy(Protocol):
    def configure_round(self, round: int, sites: Sequence[str]) -> list[str]:
        """The sites asked to train in ``round``, chosen from the ``sites`` present."""
        ...

    def check_reply(self, current: Mapping[str, torch.Tensor], reply: Reply) -> None:
        """Raise ``ValueError`` if the reply cannot be used (wrong tensors, no samples)."""
        ...

    def aggregate(
        self, current: Mapping[str, torch.Tensor], replies: Sequence[Reply]
    ) -> dict[str, torch.Tensor]:
        """The new global weights from the round's replies."""
        ...


@dataclass(frozen=True)
class FedAvg:
    """Sample-weighted averaging of every exchanged tensor.

    ``fraction`` of the present sites train each round (at least ``min_sites``), drawn with a
    generator seeded by (``seed``, round): the same job samples the same sites every time.
    """

    fraction: float = 1.0
    min_sites: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_sites < 1:
            raise ValueError(f"min_sites must be at least 1, got {self.min_sites}")

    def configure_round(self, round: int, sites: Sequence[str]) -> list[str]:
        wanted = max(self.min_sites, math.ceil(self.fraction * len(sites)))
        if wanted >= len(sites):
            return list(sites)
        chosen = set(random.Random(self.seed * 1_000_003 + round).sample(sorted(sites), wanted))
        return [site for site in sites if site in chosen]

    def aggregate(
        self, current: Mapping[str, torch.Tensor], replies: Sequence[Reply]
    ) -> dict[str, torch.Tensor]:
        if not replies:
            raise ValueError("no replies to aggregate")
        for reply in replies:
            self.check_reply(current, reply)
        return weighted_average([r.state for r in replies], [float(r.samples) for r in replies])

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
