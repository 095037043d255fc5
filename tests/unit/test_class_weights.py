"""Class weights from the statistics round: counts only, combined as scikit-learn's
"balanced", the same at every site and at the aggregator's loss, kept across a restart."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from edge_agent.data import datasets
from experiments.inprocess import run_job
from medsplit.statistics import class_counts, class_weights
from medsplit.training import loss_fn
from medsplit.transport import MemoryBroker
from medsplit.wiring import memory_connector
from models import ConfigError
from tests.support.configs import job_config

NAMES = ["site-a", "site-b", "site-c"]


def test_balanced_weights_are_scikit_learn_s_from_counts_alone() -> None:
    generator = torch.Generator().manual_seed(0)
    skews = (
        torch.tensor([0.7, 0.2, 0.1]),
        torch.tensor([0.2, 0.2, 0.6]),
        torch.tensor([0.5, 0.4, 0.1]),
    )
    sites = [
        torch.multinomial(p, n, replacement=True, generator=generator)
        for p, n in zip(skews, (30, 80, 200), strict=True)
    ]
    counts = [class_counts(y, 3) for y in sites]
    pooled = torch.cat(sites).numpy()
    expected = compute_class_weight("balanced", classes=np.arange(3), y=pooled)
    got = class_weights(counts, len(pooled))
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float32))
    # A class no site holds weighs 1; multi-label: negatives per positive, per label.
    assert class_weights([torch.tensor([4.0, 0.0])], 4)[1] == 1.0
    multi = class_counts(torch.tensor([[1, 0], [1, 1], [0, 0], [1, 0]]).float(), 2)
    assert class_weights([multi], 4, multilabel=True).tolist() == pytest.approx([1 / 3, 3.0])
    with pytest.raises(ValueError, match="every site must count the same classes"):
        class_weights([torch.ones(2), torch.ones(3)], 5)


def test_the_weighted_loss_is_the_weighted_mean_of_each_record_s() -> None:
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 2, 1])
    weights = torch.tensor([3.0, 1.5, 0.5])
    each = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    expected = (each * weights[labels]).sum() / weights[labels].sum()
    assert torch.allclose(loss_fn(logits, labels, weights), expected)


@pytest.mark.parametrize("mode", ["split", "split-u", "fedavg"])
def test_a_job_weighs_its_classes_at_every_site_and_at_the_aggregator(mode: str) -> None:
    shares = {
        n: datasets.share("breast-cancer", "dirichlet:0.3", 3, i) for i, n in enumerate(NAMES)
    }
    plan = "mlp-ehr-u" if mode == "split-u" else "mlp-ehr"
    config = job_config(
        {"job_id": "w", "plan": plan, "mode": mode, "rounds": 1, "sites": NAMES,
         "training": {"batch_size": 32, "class_weights": "balanced"}},
    )  # fmt: skip
    result = run_job(config, shares, memory_connector(MemoryBroker()))
    pooled = torch.cat([s.y_train for s in shares.values()]).numpy()
    expected = torch.tensor(
        compute_class_weight("balanced", classes=np.arange(2), y=pooled), dtype=torch.float32
    )
    assert torch.allclose(result.coordinator.state.class_weights, expected)
    for agent in result.agents.values():
        assert agent.data.class_weights is not None
        assert torch.allclose(agent.data.class_weights, expected)
    if mode == "split":  # vanilla split's loss is the aggregator's
        assert result.coordinator.trunk is not None
        weights = result.coordinator.trunk.class_weights
        assert weights is not None and torch.equal(weights, expected)
    assert torch.equal(result.coordinator.state.resume_point().class_weights, expected)


def test_balanced_weights_need_the_statistics_round() -> None:
    with pytest.raises(
        ConfigError, match="class_weights: balanced weights come from the statistics"
    ):
        job_config(
            {"job_id": "w", "plan": "mlp-ehr", "mode": "fedavg", "sites": NAMES,
             "normalization": "none", "training": {"class_weights": "balanced"}},
        )  # fmt: skip
