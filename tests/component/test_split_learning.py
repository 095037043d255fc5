"""Split learning end to end over the in-memory transport: exactness, privacy, every mode."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from aggregator.config import JobConfig
from edge_agent.data import datasets
from experiments.inprocess import run_job
from medsplit.config import OptimizerConfig
from medsplit.protocol import topics
from medsplit.training import evaluate_logits, train_centralized
from medsplit.transport import MemoryBroker
from medsplit.wire import Decoder
from medsplit.wiring import memory_connector
from tests.support.configs import job_config


def _config(**overrides: Any) -> JobConfig:
    base: dict[str, Any] = {
        "job_id": "job-t",
        "plan": "mlp-ehr-u",
        "mode": "split-u",
        "orchestration": "sequential",
        "rounds": 2,
        "batch_size": 16,
        "optimizer": {"name": "adam", "lr": 0.01},
        "seed": 3,
        "sites": ["site-a"],
        "round_deadline_s": 60,
        "join_deadline_s": 60,
        "dataset": "breast-cancer",
    }
    base.update(overrides)
    return job_config(base)


def _sites(names: list[str], partition: str = "iid") -> dict[str, datasets.SiteData]:
    shares = datasets.all_sites(datasets.load("breast-cancer"), len(names), partition, seed=0)
    return dict(zip(names, shares, strict=True))


@pytest.mark.parametrize(("mode", "plan"), [("split", "mlp-ehr"), ("split-u", "mlp-ehr-u")])
def test_one_site_split_training_equals_centralized_training(mode: str, plan: str) -> None:
    # Exactness holds without defenses: split-u's default noise on returned gradients is off.
    config = _config(mode=mode, plan=plan, rounds=3, defenses={"gradient_noise": 0})
    data = _sites(["site-a"])
    broker = MemoryBroker()
    result = run_job(config, data, memory_connector(broker))

    torch.manual_seed(config.seed)
    reference = config.plan.model.build()
    train_centralized(
        reference,
        data["site-a"].x_train,
        data["site-a"].y_train,
        epochs=3,
        batch_size=16,
        optimizer=OptimizerConfig(name="adam", lr=0.01),
        seed=config.seed,
    )
    split_state = result.final_model()
    for key, expected in reference.state_dict().items():
        torch.testing.assert_close(split_state[key], expected, atol=1e-5, rtol=0), key


def test_labels_never_leave_the_site_in_u_shaped_mode() -> None:
    config = _config(sites=["site-a", "site-b"], rounds=1)
    data = _sites(["site-a", "site-b"])
    broker = MemoryBroker()
    run_job(config, data, memory_connector(broker))

    labels = {site: d.y_train for site, d in data.items()}
    label_sets = {site: {*d.y_train.tolist(), *d.y_test.tolist()} for site, d in data.items()}
    decoder = Decoder(dedup_window=10**6)
    published_by_sites = [
        (cid, payload)
        for cid, topic, payload in broker.published
        if not cid.startswith("aggregator") and not topics.is_presence(topic)
    ]
    assert published_by_sites
    names_seen: set[str] = set()
    for site, payload in published_by_sites:
        envelope = decoder.feed(payload)
        if envelope is None:
            continue
        names_seen |= set(envelope.tensors)
        for name, tensor in envelope.tensors.items():
            # Only the sealed segments travel as bytes (opaque to the aggregator), and the
            # held-out tally as counts over the whole test split (never one per record).
            assert tensor.is_floating_point() or name in ("seal", "confusion", "scores"), (
                f"{site} sent an integer tensor {name!r}"
            )
            flat = tensor.flatten()
            for y in labels.values():
                assert not (flat.numel() == y.numel() and torch.equal(flat.to(y.dtype), y)), (
                    f"{site} sent labels as {name!r}"
                )
        assert "y" not in envelope.meta and "labels" not in envelope.meta
    assert "y" not in names_seen and {"h", "g"} <= names_seen
    assert label_sets  # both sites had labels to leak


@pytest.mark.parametrize("orchestration", ["sequential", "parallel"])
@pytest.mark.parametrize(("mode", "plan"), [("split", "mlp-ehr"), ("split-u", "mlp-ehr-u")])
def test_every_mode_and_orchestration_learns(mode: str, plan: str, orchestration: str) -> None:
    names = ["site-a", "site-b", "site-c"]
    config = _config(mode=mode, plan=plan, orchestration=orchestration, sites=names, rounds=3)
    broker = MemoryBroker()
    result = run_job(config, _sites(names), memory_connector(broker))
    assert [r.round for r in result.history] == [0, 1, 2]
    first, last = result.history[0], result.history[-1]
    assert set(last.metrics) == set(names)
    assert last.mean()["loss"] < first.mean()["loss"] or last.mean()["accuracy"] >= 0.9  # type: ignore[operator]
    assert last.mean()["accuracy"] > 0.85  # type: ignore[operator]
    for metrics in last.metrics.values():
        assert metrics["auroc"] is not None and metrics["bytes_up"] > 0


def test_parallel_rounds_average_edge_weights_by_sample_count() -> None:
    """Unsealed, so that the uploads can be read off the broker; sealed parallel rounds end with
    the same weights (test_sealed_segments.py)."""
    names = ["site-a", "site-b"]
    config = _config(orchestration="parallel", sites=names, rounds=1, seal_segments=False)
    data = _sites(names, partition="dirichlet:0.5")
    broker = MemoryBroker()
    result = run_job(config, data, memory_connector(broker))
    # What each site uploaded at the end of its local training, read off the broker.
    decoder = Decoder(dedup_window=10**6)
    uploaded = {}
    for _, topic, payload in broker.published:
        if not topic.endswith("/up/done"):
            continue
        envelope = decoder.feed(payload)
        if envelope is not None:
            uploaded[topics.parse(topic).site] = envelope.tensors
    assert set(uploaded) == set(names)
    n = {site: d.train_samples for site, d in data.items()}
    assert n["site-a"] != n["site-b"]  # a weighted and a plain mean differ
    for key, averaged in result.coordinator.global_state.items():
        expected = (
            uploaded["site-a"][key] * n["site-a"] + uploaded["site-b"][key] * n["site-b"]
        ) / sum(n.values())
        torch.testing.assert_close(averaged, expected, atol=1e-6, rtol=1e-6)
        assert not torch.equal(uploaded["site-a"][key], uploaded["site-b"][key])


def test_accuracy_matches_centralized_training_over_three_seeds() -> None:
    """breast-cancer, 3 IID sites, 10 rounds: split and split-u within 1 point of centralized."""
    names = ["site-a", "site-b", "site-c"]
    accuracy: dict[str, list[float]] = {"split": [], "split-u": [], "centralized": []}
    for seed in range(3):
        shares = datasets.all_sites(datasets.load("breast-cancer"), 3, "iid", seed=seed)
        data = dict(zip(names, shares, strict=True))
        for mode, plan in (("split", "mlp-ehr"), ("split-u", "mlp-ehr-u")):
            config = _config(
                mode=mode,
                plan=plan,
                sites=names,
                rounds=10,
                batch_size=32,
                optimizer={"lr": 1e-3},
                seed=seed,
            )
            broker = MemoryBroker()
            result = run_job(config, data, memory_connector(broker))
            accuracy[mode].append(result.history[-1].mean()["accuracy"])  # type: ignore[arg-type]
        torch.manual_seed(seed)
        model = config.plan.model.build()
        pool = datasets.pooled(shares)
        train_centralized(
            model,
            pool.x_train,
            pool.y_train,
            epochs=10,
            batch_size=32,
            optimizer=OptimizerConfig(lr=1e-3),
            seed=seed,
        )
        model.eval()
        per_site = [evaluate_logits(model(s.x_test).detach(), s.y_test).accuracy for s in shares]
        accuracy["centralized"].append(sum(per_site) / len(per_site))
    mean = {k: sum(v) / len(v) for k, v in accuracy.items()}
    assert mean["centralized"] > 0.9
    assert abs(mean["split"] - mean["centralized"]) <= 0.01
    assert abs(mean["split-u"] - mean["centralized"]) <= 0.01


@pytest.mark.parametrize("wire_dtype", ["float16", "int8", "float8_e4m3fn"])
def test_a_narrow_wire_carries_cut_layer_tensors_but_never_weights(wire_dtype: str) -> None:
    from medsplit.wire import unpack_frame  # noqa: PLC0415

    config = _config(wire_dtype=wire_dtype, rounds=1)
    broker = MemoryBroker()
    run_job(config, _sites(["site-a"]), memory_connector(broker))
    cast_by_kind: dict[str, set[str]] = {}
    for _, topic, payload in broker.published:
        if topics.is_presence(topic):
            continue
        header = unpack_frame(payload).header
        cast_by_kind.setdefault(topic.rsplit("/", 1)[-1], set()).update(header.cast)
    for kind in ("activations", "trunk-out", "trunk-grad", "act-grad"):
        assert cast_by_kind[kind], kind  # travelled as fp16
    for kind in ("train", "done", "evaluate"):
        assert cast_by_kind[kind] == set(), kind  # weights stay fp32
