"""Aggregation maths: pure functions, no I/O, tested on their own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


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
