"""Normalisation without pooling: counts, sums and sums of squares, combined across sites.

Sums of values and of squares reveal no single patient's record, yet combined across sites they
give exactly the pooled mean and standard deviation. Standardising each site with its *own*
statistics instead would erase what distinguishes sites -- under label skew, the very
difference between classes. The aggregator combines what the sites send in the statistics round
of every job; ``medsplit data-stats`` does the same offline.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

MIN_STD = 1e-6  # a feature constant across the whole federation is left unscaled, not divided by 0


@dataclass(frozen=True)
class FeatureSums:
    """What a site may share to standardise its inputs: a count and per-feature sums."""

    count: int
    total: torch.Tensor  # float64, one value per feature (tables) or channel (images)
    total_sq: torch.Tensor

    @classmethod
    def of(cls, columns: torch.Tensor) -> FeatureSums:
        """Sums over the rows of ``columns`` [N, F]."""
        wide = columns.double()
        return cls(len(columns), wide.sum(0), (wide * wide).sum(0))

    @classmethod
    def of_inputs(cls, x: torch.Tensor) -> FeatureSums:
        """Sums of model inputs: tabular rows per feature; images per channel, over all pixels
        (one intensity scale per channel keeps each scanner's differences visible)."""
        return cls.of(x if x.dim() == 2 else x.transpose(0, 1).reshape(x.shape[1], -1).T)

    @staticmethod
    def combine(parts: list[FeatureSums]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled mean and (sample) standard deviation, as float32."""
        if not parts:
            raise ValueError("no statistics to combine")
        count = sum(p.count for p in parts)
        total = torch.stack([p.total for p in parts]).sum(0)
        total_sq = torch.stack([p.total_sq for p in parts]).sum(0)
        mean = total / count
        var = (total_sq - count * mean * mean) / max(count - 1, 1)
        return mean.float(), var.clamp_min(0).sqrt().float().clamp_min(MIN_STD)


def normalization_digest(mean: torch.Tensor, std: torch.Tensor) -> str:
    """A short fingerprint of a normalisation: requests name the one they need, so a site whose
    ``normalization`` message was lost waits for it instead of training on raw inputs."""
    sha = hashlib.sha256()
    for values in (mean, std):
        sha.update(values.detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
    return sha.hexdigest()[:16]
