"""A site's epsilon: Opacus's own figures for known sigma, rate and steps, and the budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from medsplit.config import DefenseSettings
from medsplit.privacy.accounting import BudgetExceeded, PrivacyLedger, gaussian_epsilon

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


@pytest.mark.parametrize(("sigma", "steps"), [(0.8, 1), (1.0, 30), (3.0, 100), (10.0, 5)])
def test_epsilon_is_opacus_rdp_for_a_full_batch_gaussian_mechanism(
    sigma: float, steps: int
) -> None:
    expected, _ = get_privacy_spent(
        orders=ORDERS, rdp=compute_rdp(q=1.0, noise_multiplier=sigma, steps=steps, orders=ORDERS),
        delta=1e-5,
    )  # fmt: skip
    assert gaussian_epsilon(sigma, steps, 1e-5) == pytest.approx(float(expected), rel=1e-9)
    # And the closed form at rate 1: RDP(alpha) = steps * alpha / (2 sigma^2), converted at the
    # best order (Balle et al. 2020, as Opacus converts): the same number from first principles.
    alphas = np.array(ORDERS)
    rdp = steps * alphas / (2 * sigma**2)
    eps = rdp + np.log1p(-1 / alphas) - (math.log(1e-5) + np.log(alphas)) / (alphas - 1)
    assert gaussian_epsilon(sigma, steps, 1e-5) == pytest.approx(float(eps.min()), rel=1e-6)


def test_more_noise_or_fewer_releases_cost_less() -> None:
    assert gaussian_epsilon(2.0, 10, 1e-5) < gaussian_epsilon(1.0, 10, 1e-5)
    assert gaussian_epsilon(1.0, 5, 1e-5) < gaussian_epsilon(1.0, 10, 1e-5)
    assert gaussian_epsilon(1.0, 0, 1e-5) == 0.0


def test_the_ledger_adds_randomised_response_once_and_reports_none_when_unaccounted() -> None:
    assert PrivacyLedger(DefenseSettings(gradient_noise=1.0), releases=9).epsilon() is None
    labels = PrivacyLedger(DefenseSettings(label_epsilon=2.0))
    assert labels.epsilon() == 0.0
    labels.trained(3)
    assert labels.epsilon() == 2.0  # drawn once per job: repeating labels spends nothing more
    both = PrivacyLedger(
        DefenseSettings(activation_noise=2.0, activation_clip=1.0, label_epsilon=1.0), 4
    )
    assert both.epsilon() == pytest.approx(gaussian_epsilon(2.0, 4, 1e-5) + 1.0)


def test_the_budget_refuses_the_round_that_would_pass_it_and_says_so() -> None:
    settings = DefenseSettings(activation_noise=2.0, activation_clip=1.0, epsilon_budget=4.0)
    ledger = PrivacyLedger(settings)
    rounds = 0
    while True:
        try:
            ledger.before_training(1)
        except BudgetExceeded as exc:
            message = str(exc)
            break
        ledger.trained(1)
        rounds += 1
    assert rounds >= 1
    assert (ledger.epsilon() or 0) <= 4.0 < gaussian_epsilon(2.0, rounds + 1, 1e-5)
    assert "epsilon budget reached" in message and "over the budget of 4" in message
