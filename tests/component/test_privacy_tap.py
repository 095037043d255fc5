"""The aggregator's tap holds exactly what sites sent, batch by batch, so the privacy sweep's
attacks work from the wire and its scoring can name the records behind every message."""

from __future__ import annotations

import pytest
import torch

from aggregator.wire_tap import WireTap
from edge_agent.data import datasets
from experiments.inprocess import run_job
from experiments.privacy.sweep import round_batches
from medsplit.protocol import Kind
from medsplit.transport import MemoryBroker
from medsplit.wiring import memory_connector
from tests.support.configs import job_config


@pytest.mark.parametrize(
    ("mode", "plan", "noise"),
    [("split", "mlp-ehr", 0.0), ("split-u", "mlp-ehr-u", 0.5)],
)
def test_the_tap_holds_every_batch_the_aggregator_received(
    mode: str, plan: str, noise: float
) -> None:
    config = job_config(
        {
            "job_id": "job-tap",
            "plan": plan,
            "mode": mode,
            "orchestration": "sequential",
            "rounds": 2,
            "batch_size": 16,
            "seed": 4,
            "sites": ["site-a", "site-b"],
            "dataset": "breast-cancer",
            "defenses": {"activation_noise": noise, "activation_clip": 10.0} if noise else {},
        }
    )
    shares = datasets.all_sites(datasets.load("breast-cancer"), 2, "iid", seed=0)
    data = dict(zip(config.sites, shares, strict=True))
    tap = WireTap(rounds={1})
    run_job(config, data, memory_connector(MemoryBroker()), tap=tap)

    assert tap.sites() == ["site-a", "site-b"]
    for site, share in data.items():
        assert tap.messages(site, Kind.ACTIVATIONS, 0) == []  # only the rounds asked for
        sent = tap.messages(site, Kind.ACTIVATIONS, 1)
        batches = round_batches(config, share.train_samples, 1)
        assert [m.step for m in sent] == list(range(len(batches)))
        for message in sent:
            assert len(message.tensors["h"]) == len(batches[message.step])
            if mode == "split":  # labels travel beside the activations, in batch order
                assert torch.equal(message.tensors["y"], share.y_train[batches[message.step]])
            else:
                assert "y" not in message.tensors
        h = torch.cat([m.tensors["h"] for m in sent])
        # The head ends in a ReLU: only the site's noise can make an activation negative.
        assert bool((h < 0).any()) == (noise > 0)
        returned = tap.messages(site, Kind.TRUNK_GRAD, 1)
        assert len(returned) == (len(batches) if mode == "split-u" else 0)
        # Sealed by default: the aggregator receives the site's layers only as a seal.
        weights = tap.weights(site, 1)
        assert weights is not None
        assert set(weights) == {"seal"} and weights["seal"].dtype == torch.uint8
