"""Every mode and orchestration through a real Mosquitto, and the demo as processes."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import onnxruntime
import pytest
import torch
import yaml

from edge_agent.data import datasets
from edge_agent.site_model import load_site_model
from experiments.inprocess import run_job
from medsplit.brokers.embedded import EmbeddedBroker
from medsplit.brokers.mosquitto import Mosquitto
from medsplit.config import BrokerConfig
from medsplit.wiring import mqtt_connector
from tests.support.configs import job_config

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("orchestration", ["sequential", "parallel"])
@pytest.mark.parametrize(
    ("mode", "plan"),
    [("split", "mlp-ehr"), ("split-u", "mlp-ehr-u"), ("fedavg", "mlp-ehr"), ("flop", "mlp-ehr")],
)
def test_modes_train_and_improve_over_mosquitto(
    mosquitto: Mosquitto, mode: str, plan: str, orchestration: str
) -> None:
    names = ["site-a", "site-b"]
    job = f"job-{uuid.uuid4().hex[:8]}"
    config = job_config(
        {
            "job_id": job,
            "plan": plan,
            "mode": mode,
            "orchestration": orchestration,
            "rounds": 3,
            "batch_size": 32,
            "optimizer": {"lr": 0.003},
            "sites": names,
            "round_deadline_s": 120,
            "join_deadline_s": 60,
            "wire_dtype": "float16",
        }
    )
    shares = datasets.all_sites(datasets.load("breast-cancer"), 2, "iid", seed=1)

    connect = mqtt_connector(BrokerConfig(url=mosquitto.url, insecure=True))
    result = run_job(config, dict(zip(names, shares, strict=True)), connect, timeout=240)
    first, last = result.history[0].mean(), result.history[-1].mean()
    assert set(result.history[-1].metrics) == set(names)
    assert last["loss"] < first["loss"]  # type: ignore[operator]
    assert last["accuracy"] > 0.85  # type: ignore[operator]
    for agent in result.agents.values():
        assert agent.endpoint.stats.rejected == {}
        assert agent.endpoint.stats.sent_bytes > 0


def test_demo_runs_the_federation_as_processes_over_mutual_tls(tmp_path: Path) -> None:
    out = tmp_path / "run"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "medsplit",
            "demo",
            "--sites",
            "2",
            "--rounds",
            "2",
            "--out",
            str(out),
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed"
    assert (report["mode"], report["orchestration"], report["dataset"]) == (
        "split-u",
        "sequential",
        "breast-cancer",
    )
    assert [h["round"] for h in report["history"]] == [0, 1]
    assert set(report["final"]["sites"]) == {"hospital-1", "hospital-2"}
    assert all(b["up"] > 0 and b["down"] > 0 for b in report["bytes"].values())
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    page = (out / "report.html").read_text()
    assert all(site in page for site in report["final"]["sites"])
    assert (out / "model.safetensors").stat().st_size > 0
    assert "hospital-1" in completed.stdout and "accuracy" in completed.stdout  # the results table
    # Every hospital assembled its own model (trunk released at finish) and exported it.
    for site in ("hospital-1", "hospital-2"):
        model, card = load_site_model(out / "state" / site / "site-model.safetensors")
        assert card.site_id == site and card.job_id == report["job_id"]
        session = onnxruntime.InferenceSession(str(out / "state" / site / "model.onnx"))
        x = torch.randn(4, 30)
        with torch.no_grad():
            expected = model(x).numpy()
        (logits,) = session.run(["logits"], {"input": x.numpy()})
        assert abs(logits - expected).max() <= 1e-4
    assert "medsplit serve --model" in completed.stderr
    # Presence is routed away from the envelope decoder: no party rejected anything, and every
    # hospital joined exactly once.
    logs = {p.name: p.read_text() for p in (out / "logs").glob("*.log")}
    assert set(logs) == {"aggregator.log", "hospital-1.log", "hospital-2.log"}
    for name, text in logs.items():
        assert "rejected message" not in text and "BadMagic" not in text, name
    assert logs["aggregator.log"].count(" joined: ") == 2
    # It ran over mutual TLS with the throw-away federation's certificates and ACL: the broker
    # knew every client by its certificate's CN.
    job = yaml.safe_load((out / "job.yaml").read_text())
    assert job["broker"]["url"].startswith("mqtts://") and "insecure" not in job["broker"]
    broker_log = (out / "pki" / "mosquitto" / "mosquitto.log").read_text()
    for identity in ("aggregator", "hospital-1", "hospital-2"):
        assert f"u'{identity}'" in broker_log, broker_log[-2000:]
    assert "not authorised" not in broker_log.lower()
    # The aggregator served its endpoints where the demo said; each agent logged every round.
    port = job["http"]["port"]
    assert f"status page: http://127.0.0.1:{port}/" in completed.stderr
    assert f"health endpoints on http://127.0.0.1:{port}" in logs["aggregator.log"]
    for site in ("hospital-1", "hospital-2"):
        rounds = [line for line in logs[f"{site}.log"].splitlines() if f"{site} round " in line]
        assert len(rounds) == 2 and "held-out accuracy" in rounds[-1], rounds


def test_split_learning_over_the_embedded_python_broker() -> None:
    """The fallback used by `medsplit demo` when Mosquitto is missing: amqtt, MQTT 3.1.1."""
    names = ["site-a", "site-b"]
    job = f"job-{uuid.uuid4().hex[:8]}"
    config = job_config(
        {
            "job_id": job,
            "plan": "mlp-ehr-u",
            "rounds": 2,
            "sites": names,
            "round_deadline_s": 120,
            "join_deadline_s": 60,
        }
    )
    shares = datasets.all_sites(datasets.load("breast-cancer"), 2, "iid", seed=2)
    with EmbeddedBroker() as broker:
        connect = mqtt_connector(BrokerConfig(url=broker.url, protocol="3.1.1", insecure=True))
        result = run_job(config, dict(zip(names, shares, strict=True)), connect, timeout=240)
    assert [r.round for r in result.history] == [0, 1]
    assert result.history[-1].mean()["accuracy"] > 0.85  # type: ignore[operator]
