"""The statistics privacy is measured with, each with a known answer on a known case.

* ``distance_correlation``: how much the activations a site sends depend on its inputs
  (NoPeek, Vepakomma et al., arXiv 2008.09161). The bias-corrected estimator (Szekely & Rizzo,
  2014) is used because the plain one tends to 1 for *independent* high-dimensional data
  (a 64x64 image is 4096 dimensions); corrected, independent data score ~0 at any dimension and
  identical data exactly 1. The same function is NoPeek's training loss, so what a defense
  minimises is what the report measures.
* ``reconstruction_gain``: 1 - MSE(attack) / MSE(guessing the mean). 0 is what an attacker
  gets without the wire; 1 is a perfect reconstruction. For tables it is R^2 against the mean.
* ``ssim``: structural similarity of images (Wang et al., 2004), what an eye would call alike.
* ``leak_auc``: max(AUC, 1 - AUC) of an attack's scores against the true labels; 0.5 is a
  coin, 1.0 a complete leak (Li et al., arXiv 2102.08504).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional

MIN_ROWS = 4  # the bias-corrected estimator divides by n - 3


def _u_centered(distances: torch.Tensor) -> torch.Tensor:
    """U-centred distance matrix (zero diagonal), the building block of the corrected dCov."""
    n = distances.shape[0]
    rows = distances.sum(dim=1, keepdim=True) / (n - 2)
    cols = distances.sum(dim=0, keepdim=True) / (n - 2)
    total = distances.sum() / ((n - 1) * (n - 2))
    centred = distances - rows - cols + total
    return centred * (1 - torch.eye(n, dtype=distances.dtype, device=distances.device))


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bias-corrected squared distance correlation of paired rows of ``x`` and ``y``.

    Rows are samples; every other dimension is flattened. Differentiable (NoPeek's loss).
    1 for identical or similar (scaled, rotated, shifted) data, ~0 for independent data,
    slightly negative by chance. Raises ValueError for fewer than 4 rows or unpaired inputs.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"distance correlation needs paired rows, got {x.shape[0]} and {y.shape[0]}"
        )
    if x.shape[0] < MIN_ROWS:
        raise ValueError(f"distance correlation needs at least {MIN_ROWS} rows, got {x.shape[0]}")
    a = _u_centered(torch.cdist(x.flatten(1), x.flatten(1)))
    b = _u_centered(torch.cdist(y.flatten(1), y.flatten(1)))
    covariance = (a * b).sum()
    variances = (a * a).sum() * (b * b).sum()
    if float(variances.detach()) <= 0:  # a constant input: no dependence can be measured
        return covariance * 0
    return covariance / variances.sqrt()


def reconstruction_gain(
    reconstruction: torch.Tensor, target: torch.Tensor, guess: torch.Tensor
) -> float:
    """1 - MSE(reconstruction) / MSE(guess): the attack's gain over guessing ``guess`` (the
    auxiliary data's mean), as R^2 is over the mean. Negative when the attack is worse."""
    error = float(((reconstruction - target) ** 2).sum())
    baseline = float(((guess.expand_as(target) - target) ** 2).sum())
    if baseline == 0:
        raise ValueError("reconstruction gain: the targets equal the guess, nothing to gain")
    return 1.0 - error / baseline


def mse(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    return float(((reconstruction.expand_as(target) - target) ** 2).mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    line = torch.exp(-(coords**2) / (2 * sigma**2))
    line /= line.sum()
    return (line[:, None] * line[None, :])[None, None]


def ssim(images: torch.Tensor, targets: torch.Tensor, data_range: float) -> float:
    """Mean SSIM of (N, C, H, W) image pairs, Gaussian window 11 / sigma 1.5 (Wang et al.).

    ``data_range`` is the targets' value range (standardised images have no fixed one)."""
    if images.dim() != 4 or images.shape[1:] != targets.shape[1:]:
        raise ValueError(
            f"ssim needs (N, C, H, W) pairs, got {list(images.shape)} and {list(targets.shape)}"
        )
    x = images.expand_as(targets).double()
    y = targets.double()
    channels = x.shape[1]
    window = _gaussian_window().to(x).expand(channels, 1, -1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return functional.conv2d(t, window, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())


def auc(scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """ROC AUC of ``scores`` against binary ``labels``; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415 - only the sweep scores attacks

    truth = np.asarray(labels).ravel()
    if len(np.unique(truth)) < 2:
        return math.nan
    return float(roc_auc_score(truth, np.asarray(scores, dtype=np.float64).ravel()))


def leak(area: float) -> float:
    """max(AUC, 1 - AUC): how well scores separate the classes, whichever way round."""
    return max(area, 1.0 - area)


def leak_auc(scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """``leak`` of the AUC of ``scores`` against ``labels`` (NaN with one class)."""
    return leak(auc(scores, labels))


def mean_leak(areas: list[float]) -> float:
    """``leak`` of the mean of per-batch AUCs (batches with one class left out); NaN if none.

    The mean is taken before folding, so chance batches on both sides of 0.5 cancel out
    instead of each counting as a small leak."""
    present = [a for a in areas if not math.isnan(a)]
    return leak(sum(present) / len(present)) if present else math.nan
