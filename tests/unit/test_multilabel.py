"""Multi-label targets: a labels column listing any of the classes, one sigmoid per class,
trained in every family of modes, evaluated per label, served with every label it finds."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_agent.data.csv_source import load_csv_site
from edge_agent.data.settings import CsvData
from edge_agent.data.site_data import DataError, parse_target
from edge_agent.serving.predictor import Predictor
from experiments.inprocess import run_job
from medsplit.transport import MemoryBroker
from medsplit.wiring import memory_connector
from models import ConfigError
from tests.support.configs import job_config

FINDINGS = ["effusion", "nodule", "edema"]
FEATURES = [f"f{i}" for i in range(6)]


def _table(path: Path, rows: int, seed: int) -> Path:
    """Records whose findings follow their features: each label its own linear rule."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, len(FEATURES)))
    rules = np.array([[2, 0, 0, 1, 0, 0], [0, 2, 0, 0, -1, 0], [0, 0, 2, 0, 0, 1]], dtype=float)
    present = (x @ rules.T + rng.normal(scale=0.5, size=(rows, 3))) > 0.6
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*FEATURES, "findings"])
        for values, labels in zip(x, present, strict=True):
            named = "|".join(f for f, on in zip(FINDINGS, labels, strict=True) if on)
            writer.writerow([*(f"{v:.4f}" for v in values), named])
    return path


def _site(path: Path, **overrides: Any) -> CsvData:
    fields = {"path": path, "label_column": "findings", "classes": FINDINGS,
              "numeric": FEATURES, "multilabel": True, **overrides}  # fmt: skip
    return CsvData.model_validate(fields)


def test_a_label_cell_lists_any_of_the_classes() -> None:
    assert parse_target("nodule|effusion", FINDINGS, "|") == [1.0, 1.0, 0.0]
    assert parse_target(" edema ", FINDINGS, "|") == [0.0, 0.0, 1.0]
    assert parse_target("", FINDINGS, "|") == [0.0, 0.0, 0.0]  # none of them
    assert parse_target("nodule", FINDINGS, None) == 1
    with pytest.raises(ValueError, match=r"\['mass'\] in 'nodule\|mass' are not among"):
        parse_target("nodule|mass", FINDINGS, "|")


def test_a_multi_label_table_loads_as_multi_hot_targets(tmp_path: Path) -> None:
    data, summary = load_csv_site(_site(_table(tmp_path / "a.csv", 120, 0)))
    assert data.y_train.dtype == torch.float32 and data.y_train.shape[1] == 3
    assert set(torch.unique(data.y_train).tolist()) == {0.0, 1.0}
    assert data.card is not None and data.card.multilabel
    assert summary.loaded == 120
    bad = tmp_path / "bad.csv"
    bad.write_text(_table(tmp_path / "b.csv", 20, 1).read_text().replace("nodule", "mass", 1))
    with pytest.raises(DataError, match=r"row \d+: findings \['mass'\]"):
        load_csv_site(_site(bad))


@pytest.mark.parametrize(
    ("mode", "plan_u"), [("fedavg", False), ("split", False), ("split-u", True)]
)
def test_a_multi_label_job_trains_evaluates_per_label_and_serves_every_label(
    tmp_path: Path, mode: str, plan_u: bool
) -> None:
    names = ["site-a", "site-b"]
    sites = {
        name: load_csv_site(_site(_table(tmp_path / f"{name}.csv", 300, i)))[0]
        for i, name in enumerate(names)
    }
    model = {"name": "mlp", "args": {"in_features": 6, "hidden": [32, 16], "num_classes": 3}}
    plan: dict[str, Any] = {"model": model, "cut": "hidden1"}
    if plan_u:
        plan["tail_cut"] = "hidden2"
    config = job_config(
        {"job_id": "ml", "plan": plan, "mode": mode, "rounds": 6, "sites": names,
         "training": {"batch_size": 32, "multilabel": True, "class_weights": "balanced",
                      "optimizer": {"name": "adam", "lr": 0.01}}},
    )  # fmt: skip
    connect = memory_connector(MemoryBroker())
    result = run_job(config, sites, connect, state_root=tmp_path / "s", export_onnx=True)
    assert not any(result.coordinator.endpoint.stats.rejected.values())
    final = result.history[-1]
    assert final.pooled["samples"] == sum(len(s.y_test) for s in sites.values())
    assert final.pooled["macro_auroc"] is not None and final.pooled["macro_auroc"] > 0.8
    assert final.pooled["ece"] is not None
    first = result.history[0].train_loss
    assert all(final.train_loss[s] < first[s] for s in names)  # it learns every label
    onnx = result.agents["site-a"].onnx_model
    assert onnx is not None
    predictor = Predictor(onnx)
    record = {f: 3.0 if f in ("f0", "f2") else 0.0 for f in FEATURES}
    (prediction,) = predictor.predict([predictor.from_json({"record": record})])
    assert prediction.labels == ["effusion", "edema"]  # two findings at once, by sigmoid
    assert sum(prediction.probabilities.values()) > 1.0  # not a softmax


def test_a_multi_label_job_and_single_label_sites_do_not_mix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="label_epsilon: randomised response"):
        job_config(
            {"job_id": "ml", "plan": "mlp-ehr", "mode": "split", "sites": ["a"],
             "training": {"multilabel": True}, "defenses": {"label_epsilon": 2.0}},
        )  # fmt: skip
