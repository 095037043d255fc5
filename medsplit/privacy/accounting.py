"""A site's (epsilon, delta): what its noise defenses guarantee about each training record.

Two mechanisms are accounted (``DefenseSettings``):

* the **Gaussian mechanism on activations** (``activation_noise`` sigma, ``activation_clip``
  C): each sample's cut-layer activation is clipped to L2 norm C and sent with noise of
  standard deviation sigma x C, so one record changes what the aggregator sees of it by at most
  C. Every training record is sent once per local epoch -- the batches of an epoch partition
  the site's data, so the sampling rate is 1 and no amplification by subsampling is claimed --
  and the releases compose. Opacus's RDP accountant (Mironov, 2017) turns (sigma, rate 1,
  epochs) into epsilon at the job's delta; nothing here re-derives it.
* **randomised response on labels** (``label_epsilon``, vanilla ``split``): each training label
  is replaced once per job, before anything is sent, so its epsilon is spent once.

A record's two parts compose: the site reports the sum. What this does not cover, and
docs/privacy.md says: the head's weights (sealed; they reach only the job's other sites), the
held-out records' evaluation activations (a separate set, released once per round), and the
gradient noise of ``split-u``, a heuristic against label attacks with no epsilon.
"""

from __future__ import annotations

import math

from medsplit.config import DefenseSettings


class BudgetExceeded(ValueError):
    """Training on would take the site past its ``epsilon_budget``."""


def gaussian_epsilon(sigma: float, releases: int, delta: float) -> float:
    """Epsilon of ``releases`` compositions of a Gaussian mechanism with noise multiplier
    ``sigma`` (sampling rate 1), at ``delta``: Opacus's RDP accountant."""
    if releases <= 0:
        return 0.0
    from opacus.accountants import RDPAccountant  # noqa: PLC0415 - loads scipy

    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, releases)]
    return float(accountant.get_epsilon(delta))


class PrivacyLedger:
    """How often this site's training records have been released, and what that costs."""

    def __init__(self, settings: DefenseSettings, releases: int = 0) -> None:
        self.settings = settings
        self.releases = releases  # local epochs trained: each one sends every record once

    def epsilon(self, releases: int | None = None) -> float | None:
        """The site's epsilon after ``releases`` epochs (default: so far); None when nothing
        it sends is a mechanism with an epsilon."""
        settings = self.settings
        if not settings.accounted:
            return None
        count = self.releases if releases is None else releases
        total = 0.0
        if settings.activation_noise:
            total += gaussian_epsilon(settings.activation_noise, count, settings.delta)
        if settings.label_epsilon is not None and count > 0:
            total += settings.label_epsilon
        return total

    def before_training(self, epochs: int) -> None:
        """Refuse to train ``epochs`` more when that would pass the budget."""
        budget = self.settings.epsilon_budget
        if budget is None:
            return
        after = self.epsilon(self.releases + epochs)
        if after is not None and after > budget:
            spent = self.epsilon() or 0.0
            raise BudgetExceeded(
                f"epsilon budget reached: {epochs} more epoch(s) would take epsilon from "
                f"{spent:.3g} to {after:.3g} (delta {self.settings.delta:g}), over the budget "
                f"of {budget:g}; this site trains no more"
            )

    def trained(self, epochs: int) -> None:
        self.releases += epochs


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
