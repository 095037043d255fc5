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
    # float64, per class: training records of each class (multi-label: with each label).
    classes: torch.Tensor | None = None
    records: int | None = None  # the training records the class counts are of

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


def class_counts(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Records per class (float64 [classes]): of class indices, or of each label of multi-hot
    targets [N, classes]."""
    if labels.dim() == 2:
        return (labels > 0.5).double().sum(0)
    return torch.bincount(labels, minlength=classes)[:classes].double()


def class_weights(
    counts: list[torch.Tensor], records: int, multilabel: bool = False
) -> torch.Tensor:
    """Loss weights from every site's class counts and the records they came from (float32).

    One label per record: scikit-learn's "balanced", ``N / (classes * n_c)``, so that every
    class weighs as much in the loss as it would if the classes were even. Multi-label: each
    label's positive weight, ``(N - n_c) / n_c``. A class that no site holds gets 1.
    """
    widths = {len(c) for c in counts}
    if len(widths) != 1:
        raise ValueError(
            f"class counts: every site must count the same classes, got {sorted(widths)}"
        )
    per_class = torch.stack(counts).sum(0)
    present = per_class > 0
    if multilabel:
        weights = (records - per_class) / per_class.clamp_min(1)
    else:
        weights = records / (len(per_class) * per_class.clamp_min(1))
    return torch.where(present, weights, torch.ones_like(weights)).float()


def normalization_digest(
    mean: torch.Tensor, std: torch.Tensor, weights: torch.Tensor | None = None
) -> str:
    """A short fingerprint of a normalisation (and the job's class weights): requests name the
    one they need, so a site whose ``normalization`` message was lost waits for it instead of
    training on raw inputs."""
    sha = hashlib.sha256()
    for values in (mean, std, *(() if weights is None else (weights,))):
        sha.update(values.detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
    return sha.hexdigest()[:16]
