"""The privacy statistics on cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsplit.privacy import measures


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_distance_correlation_of_identical_and_similar_data_is_one() -> None:
    x = torch.randn(200, 50, generator=_gen(), dtype=torch.float64)
    assert float(measures.distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-9)
    # Invariant to scaling, shifting and rotating either side.
    rotation, _ = torch.linalg.qr(torch.randn(50, 50, generator=_gen(1), dtype=torch.float64))
    similar = 3.0 * x @ rotation + 7.0
    assert float(measures.distance_correlation(x, similar)) == pytest.approx(1.0, abs=1e-9)


def test_distance_correlation_of_independent_high_dimensional_data_is_near_zero() -> None:
    # The plain estimator says ~0.9 here (4096 dimensions); the corrected one must not.
    x = torch.randn(400, 4096, generator=_gen(2), dtype=torch.float64)
    y = torch.randn(400, 64, generator=_gen(3), dtype=torch.float64)
    assert abs(float(measures.distance_correlation(x, y))) < 0.01


def test_distance_correlation_sees_nonlinear_dependence() -> None:
    x = torch.randn(300, 5, generator=_gen(4), dtype=torch.float64)
    y = torch.relu(x @ torch.randn(5, 8, generator=_gen(5), dtype=torch.float64)) ** 2
    independent = torch.randn(300, 8, generator=_gen(6), dtype=torch.float64)
    dependent = float(measures.distance_correlation(x, y))
    assert dependent > 0.3
    assert dependent > 10 * abs(float(measures.distance_correlation(x, independent)))


def test_distance_correlation_gradient_is_finite_with_repeated_rows() -> None:
    x = torch.randn(8, 5, generator=_gen(7))
    x[1] = x[0]  # a zero distance off the diagonal
    x.requires_grad_()
    measures.distance_correlation(
        x, torch.relu(x @ torch.randn(5, 6, generator=_gen(8)))
    ).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_distance_correlation_refuses_what_it_cannot_measure() -> None:
    with pytest.raises(ValueError, match="at least 4 rows"):
        measures.distance_correlation(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="paired rows"):
        measures.distance_correlation(torch.randn(5, 2), torch.randn(6, 2))
    constant = torch.ones(10, 3)
    assert float(measures.distance_correlation(constant, torch.randn(10, 3))) == 0.0


def test_reconstruction_gain_is_one_for_a_copy_and_zero_for_the_mean() -> None:
    target = torch.randn(100, 30, generator=_gen(9))
    mean = target.mean(0, keepdim=True)
    assert measures.reconstruction_gain(target, target, mean) == pytest.approx(1.0)
    assert measures.reconstruction_gain(mean.expand_as(target), target, mean) == pytest.approx(
        0.0, abs=1e-6
    )
    assert measures.reconstruction_gain(-target, target, mean) < 0  # worse than guessing
    with pytest.raises(ValueError, match="nothing to gain"):
        measures.reconstruction_gain(target, mean.expand_as(target), mean)


def test_ssim_of_identical_images_is_one_and_falls_with_noise() -> None:
    images = torch.rand(6, 1, 32, 32, generator=_gen(10))
    assert measures.ssim(images, images, 1.0) == pytest.approx(1.0)
    slightly = measures.ssim(
        images + 0.05 * torch.randn(images.shape, generator=_gen(11)), images, 1.0
    )
    badly = measures.ssim(images + 0.5 * torch.randn(images.shape, generator=_gen(12)), images, 1.0)
    assert 1.0 > slightly > badly
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        measures.ssim(images[:, 0], images[:, 0], 1.0)


def test_leak_auc_folds_both_directions_and_is_a_coin_for_noise() -> None:
    labels = np.array([0, 0, 1, 1] * 50)
    assert measures.leak_auc(labels.astype(float), labels) == 1.0
    assert measures.leak_auc(-labels.astype(float), labels) == 1.0  # inverted scores leak too
    noise = np.random.default_rng(0).normal(size=len(labels))
    assert abs(measures.leak_auc(noise, labels) - 0.5) < 0.1
    assert math.isnan(measures.leak_auc(np.ones(4), np.ones(4)))
    # Chance batches on both sides of 0.5 cancel instead of each counting as a leak.
    assert measures.mean_leak([0.4, 0.6, math.nan]) == pytest.approx(0.5)
    assert math.isnan(measures.mean_leak([]))
