"""`medsplit status` renders a job's /status in the terminal; --log-format json logs parse."""

from __future__ import annotations

import io
import json
import logging

import pytest

from medsplit import logs
from medsplit.cli import main
from medsplit.health import HealthServer, HttpSettings

STATUS = {
    "job_id": "cxr-2027",
    "mode": "split-u",
    "orchestration": "sequential",
    "phase": "training",
    "round": 1,
    "rounds": 5,
    "rounds_completed": 1,
    "waiting_for": ["hospital-b"],
    "sites": {
        "hospital-a": {
            "state": "idle",
            "train_samples": 200,
            "last_seen_s_ago": 0.4,
            "bytes": {"up": 3_000_000, "down": 2_000_000},
            "last_metrics": {"accuracy": 0.91, "loss": 0.25},
        },
        "hospital-b": {
            "state": "training",
            "train_samples": 150,
            "last_seen_s_ago": None,
            "bytes": {"up": 0, "down": 0},
            "last_metrics": {},
        },
    },
    "history": [
        {"round": 0, "mean": {"accuracy": 0.88, "loss": 0.3}, "seconds": 4.2, "missed": []}
    ],
}


def test_status_prints_the_job_its_sites_and_rounds(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # a wide terminal: one table row a line
    server = HealthServer(HttpSettings(port=0), {}, "aggregator")
    server.status = lambda: STATUS
    port = server.start()
    try:
        assert main(["status", "--url", f"http://127.0.0.1:{port}"]) == 0
    finally:
        server.stop()
    out = capsys.readouterr().out
    assert "cxr-2027" in out and "rounds 1/5" in out and "waiting for hospital-b" in out
    row_a = next(line for line in out.splitlines() if "hospital-a" in line and "idle" in line)
    assert "0.9100" in row_a and "3.00" in row_a
    assert any("hospital-b" in line and "training" in line for line in out.splitlines())
    assert any(line.strip("│ ").startswith("0 ") and "0.8800" in line for line in out.splitlines())


def test_status_of_nothing_listening_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    server = HealthServer(HttpSettings(port=0), {}, "aggregator")
    port = server.start()
    server.stop()
    assert main(["status", "--url", f"http://127.0.0.1:{port}", "--timeout", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("no answer from")


def test_json_logs_are_one_object_a_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("medsplit.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("round %d/%d closed", 1, 5)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().strip().splitlines()]
    assert lines[0]["message"] == "round 1/5 closed"
    assert (lines[0]["level"], lines[0]["logger"]) == ("warning", "medsplit.test.json")
    assert lines[0]["time"].endswith("+00:00")
    assert "ValueError: boom" in lines[1]["exception"]


def test_the_log_format_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSPLIT_LOG_FORMAT", "JSON")
    assert logs.default_format() == "json"
    monkeypatch.setenv("MEDSPLIT_LOG_FORMAT", "")
    assert logs.default_format() == "text"
