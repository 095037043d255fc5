"""After the job: a restarted aggregator does not run a completed job again, and a process told
to wait stays up, ready, until SIGTERM (what a pod needs: Kubernetes restarts every exit)."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

import pytest

from aggregator.config import JobConfig
from aggregator.main import run
from medsplit.brokers.mosquitto import free_port
from medsplit.health import HealthServer, HttpSettings
from medsplit.transport import TransportError
from tests.support.configs import job_config


def _config(tmp_path: Path) -> JobConfig:
    return job_config(
        {
            "job_id": "job-done",
            "plan": "mlp-ehr-u",
            "sites": ["a"],
            "seal_segments": False,  # no roster here: the job must get as far as connecting
            "checkpoint": {"dir": str(tmp_path / "checkpoints")},
            "state": {"run_dir": str(tmp_path / "run")},
            "broker": {  # a closed port: connecting fails within a second
                "url": f"mqtt://127.0.0.1:{free_port()}",
                "insecure": True,
                "retry_for_s": 0.5,
                "connect_timeout_s": 0.5,
            },
        }
    )


def _report(config: JobConfig, *, status: str, unconfirmed: list[str]) -> None:
    config.output_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "job_id": config.job_id,
        "status": status,
        "faults": {"unconfirmed_finish": unconfirmed},
    }
    (config.output_dir / "report.json").write_text(json.dumps(report))


def test_a_completed_job_is_not_run_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = _config(tmp_path)  # its broker is a closed port: connecting would fail
    _report(config, status="completed", unconfirmed=[])
    with caplog.at_level(logging.INFO, logger="aggregator.main"):
        assert run(config) == 0
    assert "already completed" in caplog.text


@pytest.mark.parametrize(("status", "unconfirmed"), [("completed", ["a"]), ("interrupted", [])])
def test_a_job_with_something_left_runs(
    tmp_path: Path, status: str, unconfirmed: list[str]
) -> None:
    config = _config(tmp_path)
    _report(config, status=status, unconfirmed=unconfirmed)
    with pytest.raises(TransportError):  # it tried to connect: the job goes on
        run(config)


def test_linger_serves_until_sigterm_and_says_the_job_is_over() -> None:
    server = HealthServer(HttpSettings(port=0), {"broker": lambda: "down"}, "aggregator")
    server.start()
    sent = threading.Event()

    def terminate_once_lingering() -> None:
        while server.readiness() != {"job": "ok"}:  # linger switched its checks: handler is in
            threading.Event().wait(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        sent.set()

    previous = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=terminate_once_lingering, daemon=True)
    thread.start()
    try:
        server.linger("job j is over")
    finally:
        server.stop()
    assert sent.is_set()
    assert signal.getsignal(signal.SIGTERM) == previous  # the process's own handler is back
