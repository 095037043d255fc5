"""A site's defenses: off means untouched, on means exactly the configured perturbation."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from medsplit.config import DefenseSettings
from medsplit.privacy import measures
from medsplit.privacy.defenses import SiteDefenses
from medsplit.protocol import JobSpec
from models import ConfigError
from tests.support.configs import job_config


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_with_every_defense_off_nothing_is_touched() -> None:
    defenses = SiteDefenses(DefenseSettings())
    x = torch.randn(8, 5, generator=_gen(0))
    weight = torch.randn(5, 6, generator=_gen(1), requires_grad=True)
    h = x @ weight
    assert torch.equal(defenses.activations(h), h.detach())
    g = torch.randn(8, 6, generator=_gen(2))
    assert defenses.gradient(g) is g
    defenses.backward_head(x, [h], [g])
    assert weight.grad is not None
    torch.testing.assert_close(weight.grad, x.T @ g)


def test_activation_noise_has_the_configured_spread_and_cannot_be_replayed() -> None:
    h = torch.zeros(200, 500)
    mechanism = DefenseSettings(activation_noise=0.3, activation_clip=2.0)
    sent = SiteDefenses(mechanism).activations(h)
    assert float(sent.std()) == pytest.approx(0.3 * 2.0, rel=0.02)  # sigma times the bound
    again = SiteDefenses(mechanism).activations(h)
    assert not torch.equal(sent, again)  # seeded by the OS, not by the job's (known) seed
    seeded = [SiteDefenses(mechanism, seed=5) for _ in range(2)]
    assert torch.equal(seeded[0].activations(h), seeded[1].activations(h))


def test_each_activation_is_clipped_to_the_bound_before_noise() -> None:
    h = torch.randn(64, 30, generator=_gen(1)) * torch.linspace(0.01, 10, 64)[:, None]
    sent = SiteDefenses(DefenseSettings(activation_clip=1.5)).activations(h)
    norms = sent.norm(dim=1)
    assert float(norms.max()) <= 1.5 + 1e-5
    small = h.norm(dim=1) < 1.5
    torch.testing.assert_close(sent[small], h[small])  # below the bound: untouched
    # The head is trained through the clipping: a clipped row's gradient loses its radial part.
    x = torch.randn(4, 3, generator=_gen(2))
    weight = torch.randn(3, 5, generator=_gen(3), requires_grad=True)
    out = x @ weight * 100  # far above the bound
    grad = out.detach() / out.detach().norm(dim=1, keepdim=True)  # along each row
    SiteDefenses(DefenseSettings(activation_clip=1.0)).backward_head(x, [out], [grad])
    assert weight.grad is not None and float(weight.grad.abs().max()) < 1e-4


def test_randomised_response_keeps_each_label_at_its_rate_once_per_job() -> None:
    y = torch.randint(0, 2, (20_000,), generator=_gen(4))
    defenses = SiteDefenses(DefenseSettings(label_epsilon=1.0), seed=3)
    sent = defenses.labels(y, classes=2)
    kept = float((sent == y).float().mean())
    assert kept == pytest.approx(math.e / (math.e + 1), abs=0.01)
    assert torch.equal(defenses.labels(y, classes=2), sent)  # drawn once: repeats spend nothing
    assert SiteDefenses(DefenseSettings()).labels(y, classes=2) is y


def test_gradient_noise_is_scaled_to_the_batch_gradient_norm() -> None:
    g = torch.randn(64, 400, generator=_gen(3)) * 1e-3  # gradients are small; noise follows
    noisy = SiteDefenses(DefenseSettings(gradient_noise=2.0), seed=1).gradient(g)
    ratio = (noisy - g).norm(dim=1).mean() / g.norm(dim=1).mean()
    assert float(ratio) == pytest.approx(2.0, rel=0.05)


def test_nopeek_adds_the_gradient_of_alpha_times_distance_correlation() -> None:
    x = torch.randn(16, 5, generator=_gen(4))
    g = torch.randn(16, 6, generator=_gen(5))
    weight = torch.randn(5, 6, generator=_gen(6), requires_grad=True)
    SiteDefenses(DefenseSettings(nopeek_alpha=0.7)).backward_head(x, [torch.relu(x @ weight)], [g])
    assert weight.grad is not None
    reference = torch.randn(5, 6).copy_(weight.detach()).requires_grad_()
    h = torch.relu(x @ reference)
    ((h * g).sum() + 0.7 * measures.distance_correlation(x, h)).backward()
    assert reference.grad is not None
    torch.testing.assert_close(weight.grad, reference.grad)


def test_nopeek_alone_makes_a_head_say_less_about_its_inputs() -> None:
    x = torch.randn(64, 5, generator=_gen(7))
    head = torch.nn.Linear(5, 8)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.1)
    defenses = SiteDefenses(DefenseSettings(nopeek_alpha=1.0))
    before = float(measures.distance_correlation(x, torch.relu(head(x)).detach()))
    for _ in range(40):
        optimizer.zero_grad()
        h = torch.relu(head(x))
        defenses.backward_head(x, [h], [torch.zeros_like(h)])
        optimizer.step()
    after = measures.distance_correlation(x, torch.relu(head(x)).detach())
    assert float(after) < before / 2


def _job(**overrides: Any) -> dict[str, Any]:
    return {
        "job_id": "job-d",
        "plan": "mlp-ehr-u",
        "mode": "split-u",
        "sites": ["site-a"],
        **overrides,
    }


def test_defenses_reach_the_sites_in_the_job_spec() -> None:
    config = job_config(
        _job(defenses={"activation_noise": 0.5, "activation_clip": 4, "gradient_noise": 1.0})
    )
    assert config.defenses.label() == "noise 0.5 + clip 4 + grad-noise 1"
    spec = JobSpec(
        job_id="job-d",
        mode=config.mode,
        orchestration=config.orchestration,
        plan=config.plan,
        rounds=1,
        local_epochs=1,
        batch_size=8,
        optimizer=config.training.optimizer,
        seed=0,
        wire_dtype="float32",
        defenses=config.defenses,
    )
    assert JobSpec.from_meta(spec.to_meta()).defenses == config.defenses
    # Undefended, the spec reads as it did before defenses existed (older agents still join).
    plain = spec.model_copy(update={"defenses": DefenseSettings()})
    assert "defenses" not in json.loads(plain.to_meta())
    assert JobSpec.from_meta(plain.to_meta()) == plain


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "fedavg", "plan": "mlp-ehr", "defenses": {"activation_noise": 1}}, "defenses"),
        ({"mode": "split", "plan": "mlp-ehr", "defenses": {"gradient_noise": 1}}, "split-u"),
        ({"defenses": {"activation_noise": -1}}, "activation_noise"),
        ({"defenses": {"activation_noise": 1}}, "activation_clip"),
        ({"defenses": {"epsilon_budget": 3}}, "nothing is accounted"),
        ({"defenses": {"label_epsilon": 1}}, "no label travels"),
        ({"defenses": {"nopeek": 1}}, "nopeek"),
    ],
)
def test_a_defense_that_would_do_nothing_is_refused(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        job_config(_job(**overrides))
