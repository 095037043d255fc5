"""The experiment grid: config validation, baselines, partitions and the results it writes."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from aggregator.config import JobConfig
from aggregator.state import RoundRecord
from edge_agent.data import datasets
from edge_agent.data.partitions import Scanner
from experiments.baselines import run_centralized, run_local
from experiments.config import ExperimentConfig
from experiments.results import write_results
from experiments.runner import CellResult
from medsplit.cli import main
from models import ConfigError
from tests.support.configs import job_config


def _experiment(**overrides: Any) -> ExperimentConfig:
    base: dict[str, Any] = {"name": "exp", "seeds": [0], "rounds": 2}
    base.update(overrides)
    return ExperimentConfig.model_validate(base)


def test_grid_has_one_cell_per_mode_orchestration_partition_size_and_seed() -> None:
    config = _experiment(
        orchestrations=["sequential", "parallel"],
        partitions=["iid", "dirichlet:0.5"],
        sites=[3, 5],
        seeds=[0, 1],
    )
    cells = config.cells()
    # 6 modes, split and split-u in both orchestrations: 8 methods.
    assert len(cells) == 8 * 2 * 2 * 2
    assert len({c.job_id(config.name) for c in cells}) == len(cells)
    methods = {c.method for c in cells}
    assert methods == {
        "centralized",
        "local",
        "fedavg",
        "flop",
        "split (sequential)",
        "split (parallel)",
        "split-u (sequential)",
        "split-u (parallel)",
    }
    job = config.job_config(cells[-1], "mqtt://127.0.0.1:1883")
    assert job.mode == "split-u" and job.plan.u_shaped and len(job.sites) == 5


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"modes": ["fedprox"]}, "modes.0"),
        ({"partitions": ["stripes"]}, "partitions"),
        ({"sites": [0]}, "sites"),
        ({"dataset": "mnist"}, "dataset"),
        ({"plans": {"federated": "cnn-cxr"}}, "plans: every mode must train the same model"),
        ({"plans": {"split": "mlp-ehr-u"}, "modes": ["split"]}, "mode: split needs a plan"),
        ({"rounds": 0}, "rounds"),
        ({"name": "a/b"}, "name"),
    ],
)
def test_bad_experiment_files_are_refused_naming_the_field(
    tmp_path: Path, overrides: dict[str, Any], field: str
) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "exp", **overrides}))
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_yaml(path)
    assert str(path) in str(info.value)
    assert field in str(info.value)


def test_cli_refuses_a_bad_experiment_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("name: exp\nmodes: [fedprox]\n")
    assert main(["experiment", "--config", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: modes.0:")


def _job(**overrides: Any) -> JobConfig:
    base: dict[str, Any] = {
        "job_id": "b",
        "plan": "mlp-ehr",
        "mode": "fedavg",
        "rounds": 3,
        "batch_size": 16,
        "optimizer": {"name": "adam", "lr": 0.01},
        "sites": ["a", "b", "c"],
    }
    base.update(overrides)
    return job_config(base)


def test_local_baseline_is_each_site_alone_and_centralized_pools_everything() -> None:
    shares = datasets.all_sites(datasets.load("breast-cancer"), 3, "iid", seed=0)
    sites = dict(zip(["a", "b", "c"], shares, strict=True))
    local = run_local(_job(), sites)
    central = run_centralized(_job(), sites)
    assert len(local) == len(central) == 3
    assert set(local[-1].metrics) == set(central[-1].metrics) == {"a", "b", "c"}
    assert set(local[-1].train_loss) == {"a", "b", "c"} and set(central[-1].train_loss) == {
        "pooled"
    }
    # With a single site, "alone" and "pooled" are the same training: identical metrics.
    one = {"a": shares[0]}
    alone = run_local(_job(sites=["a"]), one)[-1].metrics["a"]
    pooled = run_centralized(_job(sites=["a"]), one)[-1].metrics["a"]
    assert alone == pooled
    # Both learn: held-out accuracy well above the majority class.
    assert local[-1].mean()["accuracy"] > 0.85
    assert central[-1].mean()["accuracy"] > 0.9


def test_shards_give_each_site_at_most_k_classes() -> None:
    labels = torch.arange(1000) % 10
    parts = datasets.partition(labels, 5, "shards:2", seed=3)
    joined = np.sort(np.concatenate(parts))
    assert np.array_equal(joined, np.arange(1000))
    assert all(len(np.unique(labels.numpy()[p])) <= 2 for p in parts)
    assert datasets.partition(labels, 5, "shards:2", seed=3)[0].tolist() == parts[0].tolist()
    with pytest.raises(ValueError, match="shards too small"):
        datasets.partition(labels, 200, "shards:5")


def test_feature_shift_gives_each_site_its_own_scanner() -> None:
    dataset = datasets.load("synthetic-cxr")
    shifted = datasets.all_sites(dataset, 4, "feature-shift", seed=0)
    plain = datasets.all_sites(dataset, 4, "iid", seed=0)
    for a, b in zip(shifted, plain, strict=True):
        assert torch.equal(a.y_train, b.y_train)  # same patients, other scanners
    scanned = Scanner.for_site(1, seed=0).apply(dataset.x[:20], seed=0)
    assert float(scanned.min()) >= 0 and float(scanned.max()) <= 1
    assert not torch.equal(scanned, dataset.x[:20])
    # Intensities are put on one scale for all sites together, which keeps their differences.
    pixels = torch.cat([s.x_train for s in shifted])
    assert abs(float(pixels.mean())) < 1e-4 and abs(float(pixels.std()) - 1) < 1e-3

    def spread(shares: list[datasets.SiteData]) -> float:
        means = [float(s.x_train.mean()) for s in shares]
        return max(means) - min(means)

    assert spread(shifted) > 5 * spread(plain)
    assert torch.equal(
        datasets.share("synthetic-cxr", "feature-shift", 4, 2).x_test, shifted[2].x_test
    )
    with pytest.raises(ValueError, match="feature-shift applies to image datasets"):
        datasets.all_sites(datasets.load("breast-cancer"), 3, "feature-shift")


def test_results_summarise_seeds_and_mark_failures(tmp_path: Path) -> None:
    config = _experiment(modes=["local", "fedavg"], seeds=[0, 1], out=str(tmp_path))
    cells = config.cells()
    shares = datasets.all_sites(datasets.load("breast-cancer"), 3, "iid", seed=0)
    sites = dict(zip(["site-01", "site-02", "site-03"], shares, strict=True))
    history = run_local(config.job_config(cells[0], "mqtt://x:1"), sites)
    results = [
        CellResult(cells[0], "completed", history, wall_time_s=1.0),
        CellResult(cells[1], "completed", history, wall_time_s=3.0),
        CellResult(
            cells[2],
            "completed",
            history,
            traffic={s: {"up": 2_000_000, "down": 4_000_000} for s in sites},
        ),
        CellResult(cells[3], "failed", error="JobFailed: only 1 of 3 sites joined"),
    ]
    written = write_results(config, results)
    assert {p.name for p in written} >= {"results.md", "summary.csv", "cells.csv", "iid-3sites.png"}
    summary = {row["method"]: row for row in csv.DictReader((tmp_path / "summary.csv").open())}
    assert summary["local"]["runs"] == "2" and summary["local"]["failed"] == "0"
    assert float(summary["local"]["seconds_mean"]) == 2.0
    assert float(summary["local"]["seconds_std"]) == pytest.approx(1.4142, abs=1e-3)
    assert summary["fedavg"]["failed"] == "1"
    assert float(summary["fedavg"]["mb_up_mean"]) == 2.0
    markdown = (tmp_path / "results.md").read_text()
    assert "| fedavg |" in markdown and "| 1/2 |" in markdown
    rows = list(csv.DictReader((tmp_path / "cells.csv").open()))
    assert [r["status"] for r in rows] == ["completed", "completed", "completed", "failed"]
    assert rows[-1]["error"].startswith("JobFailed")


def test_each_wire_dtype_is_a_row_of_the_split_modes_only() -> None:
    config = _experiment(modes=["fedavg", "split-u"], wire_dtypes=["float32", "int8"])
    methods = [c.method for c in config.cells()]
    assert methods == ["fedavg", "split-u (sequential)", "split-u (sequential, int8 wire)"]
    int8 = config.cells()[-1]
    assert config.job_config(int8, "mqtt://127.0.0.1:1883").training.wire_dtype == "int8"
    assert len({c.job_id(config.name) for c in config.cells()}) == 3
    # The single-valued key of earlier files still reads.
    assert _experiment(wire_dtype="float16").wire_dtypes == ["float16"]


def test_a_narrow_wire_reports_its_accuracy_cost_against_float32(tmp_path: Path) -> None:
    config = _experiment(modes=["split-u"], wire_dtypes=["float32", "int8"], out=str(tmp_path))
    fp32, int8 = config.cells()

    def history(accuracy: float) -> list[RoundRecord]:
        return [RoundRecord(0, metrics={"site-01": {"accuracy": accuracy, "auroc": 0.9}})]

    results = [
        CellResult(fp32, "completed", history(0.90), wall_time_s=1.0),
        CellResult(int8, "completed", history(0.885), wall_time_s=1.0),
    ]
    write_results(config, results)
    markdown = (tmp_path / "results.md").read_text()
    assert "| split-u (sequential, int8 wire) | 0.885 ± 0.000 | -1.50 |" in markdown
    assert "| split-u (sequential) | 0.900 ± 0.000 | - |" in markdown
