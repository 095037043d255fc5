"""A site's side of the statistics round: its sums out, the federation's normalisation in.

The site sends the count, sums and sums of squares of its training inputs (``FeatureSums``;
never a value) and gets back the mean and standard deviation combined over every site. It
applies them to its training and test inputs, and folds them into its data card, so that the
exported model and the inference service prepare an input exactly as training saw it. Applying
always starts from the data as loaded, so a repeated ``normalization`` message changes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch

from edge_agent.data.inputs import DataCard, FeatureInput, InputSpec
from edge_agent.data.settings import Standardisation
from edge_agent.data.site_data import SiteData
from medsplit.statistics import FeatureSums

S = TypeVar("S", bound=Standardisation)


def site_sums(data: SiteData) -> FeatureSums:
    return FeatureSums.of_inputs(data.x_train)


def normalise(data: SiteData, mean: torch.Tensor, std: torch.Tensor) -> SiteData:
    """``data`` with ``(x - mean) / std`` applied per feature (tables) or channel (images).

    Tables: only the numeric columns are standardised; one-hot groups stay 0/1.
    """
    width = _standardised_width(data)
    return dataclasses.replace(
        data,
        x_train=_apply(data.x_train, mean, std, width),
        x_test=_apply(data.x_test, mean, std, width),
        card=None if data.card is None else _fold(data.card, mean, std),
    )


def _standardised_width(data: SiteData) -> int:
    if data.card is not None and isinstance(data.card.input, FeatureInput):
        return len(data.card.input.numeric)
    return data.x_train.shape[1]


def _apply(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, width: int) -> torch.Tensor:
    if len(x) == 0:
        return x
    shape = (1, -1) + (1,) * (x.dim() - 2)  # per feature [N, F], per channel [N, C, H, W]
    m = mean[:width].to(x.dtype).reshape(shape)
    s = std[:width].to(x.dtype).reshape(shape)
    out = x.clone()
    out[:, :width] = (x[:, :width] - m) / s
    return out


def _fold_images(pre: S, mean: torch.Tensor, std: torch.Tensor, channels: int) -> S:
    """The same fold per channel: one value for a one-channel image, a list for RGB."""
    m0, s0 = _per_channel(pre.mean, channels), _per_channel(pre.std, channels)
    means = [a + float(m) * b for a, b, m in zip(m0, s0, mean[:channels], strict=True)]
    stds = [b * float(s) for b, s in zip(s0, std[:channels], strict=True)]
    if channels == 1:
        return pre.model_copy(update={"mean": means[0], "std": stds[0]})
    return pre.model_copy(update={"mean": means, "std": stds})


def _per_channel(value: float | list[float], channels: int) -> list[float]:
    return list(value) if isinstance(value, list) else [float(value)] * channels


def _fold(card: DataCard, mean: torch.Tensor, std: torch.Tensor) -> DataCard:
    """The card whose encoding includes this normalisation: (x - m0)/s0 then (. - m)/s is
    x - (m0 + m*s0), divided by s0*s."""
    spec = card.input
    if isinstance(spec, FeatureInput):
        width = len(spec.numeric)
        pairs = zip(spec.mean, spec.std, mean[:width].tolist(), std[:width].tolist(), strict=True)
        folded = [(m0 + m * s0, s0 * s) for m0, s0, m, s in pairs]
        new_input: InputSpec = spec.model_copy(
            update={"mean": [f[0] for f in folded], "std": [f[1] for f in folded]}
        )
    else:
        new_input = spec.model_copy(
            update={"preprocessing": _fold_images(spec.preprocessing, mean, std, spec.channels)}
        )
    return card.model_copy(update={"input": new_input})
