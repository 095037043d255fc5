"""``medsplit experiment`` end to end: every mode through a real Mosquitto, results written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from medsplit.brokers.mosquitto import Mosquitto
from medsplit.cli import main

pytestmark = pytest.mark.integration


def test_experiment_compares_every_mode_through_mosquitto(
    mosquitto: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    config = {
        "name": "it",
        "dataset": "breast-cancer",
        "orchestrations": ["parallel"],
        "sites": [2],
        "seeds": [0],
        "rounds": 2,
        "optimizer": {"lr": 0.005},
        "broker": {"url": mosquitto.url, "insecure": True},
        "out": str(out),
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["experiment", "--config", str(path)]) == 0
    printed = capsys.readouterr().out.split()
    assert str(out / "results.md") in printed and str(out / "iid-2sites.png") in printed

    rows = {row["method"]: row for row in csv.DictReader((out / "cells.csv").open())}
    assert set(rows) == {
        "centralized",
        "local",
        "fedavg",
        "flop",
        "split (parallel)",
        "split-u (parallel)",
    }
    assert all(row["status"] == "completed" for row in rows.values())
    assert all(float(row["accuracy"]) > 0.8 for row in rows.values())
    up = {method: float(row["bytes_up_per_site"]) for method, row in rows.items()}
    assert up["centralized"] == up["local"] == 0  # the baselines never touch the network
    assert 0 < up["flop"] < up["fedavg"] < up["split-u (parallel)"]
    # Each cell leaves a report in the same format as a deployed job's.
    reports = [json.loads(p.read_text()) for p in (out / "runs").glob("*/report.json")]
    assert sorted(r["mode"] for r in reports) == sorted(
        ["centralized", "local", "fedavg", "flop", "split", "split-u"]
    )
    assert all(len(r["history"]) == 2 and r["status"] == "completed" for r in reports)
    assert "| flop |" in (out / "results.md").read_text()


def test_a_vertical_experiment_compares_the_arrangements_with_its_baselines(
    mosquitto: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    config = {
        "name": "vit",
        "vertical": True,
        "parties": [3],
        "seeds": [0],
        "rounds": 3,
        "optimizer": {"lr": 0.005},
        "broker": {"url": mosquitto.url, "insecure": True},
        "out": str(out),
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["experiment", "--config", str(path)]) == 0
    assert str(out / "results.md") in capsys.readouterr().out.split()

    text = (out / "results.md").read_text()
    rows = [line.split(" | ")[0].removeprefix("| ") for line in text.splitlines()]
    assert [r for r in rows if r.startswith(("vertical", "centralized", "alone"))] == [
        "vertical (top at the label party)",
        "vertical (top at the aggregator)",
        "centralized (joined table)",
        "alone: hospital's columns",
        "alone: imaging's columns",
        "alone: registry's columns",
    ]
    assert "exactly the centralized weights in 1 of 1 runs" in text
    reports = [json.loads(p.read_text()) for p in (out / "runs").glob("*/report.json")]
    assert sorted(r["mode"] for r in reports) == ["vertical", "vertical"]
    assert all(r["status"] == "completed" for r in reports)


def test_the_vertical_privacy_sweep_measures_what_gradients_tell_of_the_labels(
    mosquitto: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    config = {
        "name": "vpriv",
        "vertical": True,
        "parties": [2],
        "seeds": [0],
        "rounds": 2,
        "broker": {"url": mosquitto.url, "insecure": True},
        "out": str(out),
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["privacy", "--config", str(path)]) == 0
    assert str(out / "privacy.md") in capsys.readouterr().out.split()

    lines = (out / "privacy.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| arrangement"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {
        tuple(cells[:3]): dict(zip(columns, cells, strict=True))
        for line in lines
        if line.startswith("| top")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    leak = "imaging (no labels): cosine"
    undefended = rows[("top at the label party", "2", "none")]
    defended = rows[("top at the label party", "2", "default")]
    assert float(undefended[leak].split(" ")[0]) > 0.9  # the passive party reads the labels
    assert float(defended[leak].split(" ")[0]) < float(undefended[leak].split(" ")[0])
    assert rows[("top at the aggregator", "2", "none")]["aggregator (labels sent)"].startswith(
        "1.00"
    )
    # With the top at the aggregator, the aggregator noises the passive party's gradients.
    exposed = rows[("top at the aggregator", "2", "none")]
    shielded = rows[("top at the aggregator", "2", "default")]
    assert float(exposed[leak].split(" ")[0]) > 0.9
    assert float(shielded[leak].split(" ")[0]) < float(exposed[leak].split(" ")[0])
