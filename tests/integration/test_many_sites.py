"""Twenty-five hospitals as real processes over Mosquitto with mutual TLS: the job completes,
every site has its model, the report has a row for every site and the pooled test set is all
of theirs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration
SITES = 25


def test_twenty_five_sites_train_as_processes_and_each_ends_with_its_model(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "medsplit", "demo", "--sites", str(SITES), "--mode",
               "fedavg", "--rounds", "2", "--out", str(out), "--timeout", "600"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    names = {f"hospital-{i}" for i in range(1, SITES + 1)}
    assert report["status"] == "completed" and set(report["sites"]) == names
    final = report["final"]
    assert set(final["sites"]) == names and not final["missed"]
    assert all(
        row["samples"] > 0 and row["accuracy"] is not None for row in final["sites"].values()
    )
    assert final["pooled"]["samples"] == sum(row["samples"] for row in final["sites"].values())
    page = (out / "report.html").read_text()
    assert all(f"<td>{site}</td>" in page for site in names)
    for site in names:  # every hospital assembled its own model and exported it
        state = out / "state" / site
        assert (state / "site-model.safetensors").stat().st_size > 0
        assert (state / "model.onnx").stat().st_size > 0
    aggregator_log = (out / "logs" / "aggregator.log").read_text()
    assert aggregator_log.count(" joined: ") == SITES
    assert "rejected message" not in aggregator_log
    broker_log = (out / "pki" / "mosquitto" / "mosquitto.log").read_text()
    assert "not authorised" not in broker_log.lower()
