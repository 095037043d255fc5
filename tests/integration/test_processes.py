"""The two processes started as a deployment starts them, against a real Mosquitto.

What a hospital's IT sees when something is off: a second aggregator for a live job, a site
that is not in the job, a broker that cannot be reached, sites that start before the server.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import torch
import yaml

from edge_agent.data import datasets
from experiments.inprocess import run_job
from medsplit.brokers.mosquitto import Mosquitto, free_port
from medsplit.config import BrokerConfig
from medsplit.protocol import topics
from medsplit.protocol.presence import Presence
from medsplit.transport import MqttSettings, MqttTransport
from medsplit.wiring import mqtt_connector
from tests.support.configs import job_config

MEDSPLIT = [sys.executable, "-m", "medsplit"]


def _write(path: Path, data: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _await_live_aggregator(port: int, job: str, timeout: float = 60) -> Presence:
    watcher = MqttTransport(MqttSettings(port=port, client_id=f"watch-{uuid.uuid4().hex[:6]}"))
    with watcher:
        watcher.subscribe(topics.aggregator_presence(job))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = watcher.receive(timeout=1)
            if message is not None:
                presence = Presence.from_bytes(message.payload)
                if presence.state == "online":
                    return presence
    raise AssertionError(f"no aggregator of {job} came online within {timeout:g} s")


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MEDSPLIT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_a_second_aggregator_refuses_and_a_stranger_site_is_sent_away(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    job = f"job-{uuid.uuid4().hex[:8]}"
    broker = {"url": mosquitto.url, "insecure": True}
    job_yaml = _write(
        tmp_path / "job.yaml",
        {
            "job_id": job,
            "plan": "mlp-ehr-u",
            "sites": ["site-a"],
            "seal_segments": False,  # this test is about the coordination lock, not sealing
            "rounds": {"join_deadline_s": 300},
            "broker": broker,
            "state": {"run_dir": str(tmp_path / "run")},
        },
    )
    first = subprocess.Popen(
        [*MEDSPLIT, "aggregator", "--config", str(job_yaml)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        live = _await_live_aggregator(mosquitto.port, job)
        second = _run("aggregator", "--config", str(job_yaml))
        assert second.returncode == 3, second.stderr[-2000:]
        assert f"job {job} is already coordinated by aggregator" in second.stderr
        assert live.incarnation in second.stderr and "up since" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first one is untouched and still coordinating

        stranger = _write(
            tmp_path / "site.yaml",
            {
                "site_id": "site-z",
                "job_id": job,
                "broker": broker,
                "state": {"dir": str(tmp_path / "z")},
            },
        )
        refused = _run("agent", "--config", str(stranger))
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert f"'site-z' is not part of job {job}" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        first.terminate()
        first.wait(30)


def test_an_unreachable_broker_is_one_clear_line_after_the_configured_retries(
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens here
    site = _write(
        tmp_path / "site.yaml",
        {
            "site_id": "site-a",
            "job_id": "j",
            "broker": {
                "url": f"mqtt://127.0.0.1:{port}",
                "insecure": True,
                "retry_for_s": 2,
                "reconnect_min_s": 1,
            },
            "state": {"dir": str(tmp_path / "s")},
        },
    )
    completed = _run("agent", "--config", str(site))
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not connect to 127.0.0.1:{port} within 2 s"), last
    retries = [line for line in completed.stderr.splitlines() if "not reachable" in line]
    assert 1 <= len(retries) <= 3  # one line per attempt, not a flood


def test_the_same_seed_gives_the_same_numbers_whatever_the_start_order(
    mosquitto: Mosquitto,
) -> None:
    names = ["site-a", "site-b", "site-c"]
    shares = dict(
        zip(names, datasets.all_sites(datasets.load("breast-cancer"), 3, "iid"), strict=True)
    )
    outcomes = []
    for agents_first in (False, True, True):
        config = job_config(
            {
                "job_id": f"job-{uuid.uuid4().hex[:8]}",
                "plan": "mlp-ehr-u",
                "mode": "split-u",
                "orchestration": "sequential",
                "rounds": 2,
                "seed": 0,
                "sites": names,
                "broker": {"url": mosquitto.url, "insecure": True},
                # Runs compared bit for bit: without the default (secret) gradient noise.
                "defenses": {"gradient_noise": 0},
            }
        )
        result = run_job(
            config,
            shares,
            mqtt_connector(BrokerConfig(url=mosquitto.url, insecure=True)),
            timeout=240,
            agents_first=agents_first,
        )
        outcomes.append(result)
    reference = outcomes[0]
    for other in outcomes[1:]:
        for mine, theirs in zip(reference.history, other.history, strict=True):
            assert mine.train_loss == theirs.train_loss
            assert mine.metrics.keys() == theirs.metrics.keys()
            for site in names:
                assert mine.metrics[site]["loss"] == theirs.metrics[site]["loss"]
        final, again = reference.final_model(), other.final_model()
        assert all(torch.equal(final[k], again[k]) for k in final)
        # Every site trained each round exactly once, however many hellos it sent.
        assert [r.trained for r in other.history] == [names, names]
        assert all(agent.hellos_sent >= 2 for agent in other.agents.values())


class _Retries(logging.Handler):
    """Signals the first "not reachable" line: the client has failed once and is retrying."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "not reachable" in record.getMessage():
            self.seen.set()


def test_a_client_started_before_its_broker_connects_when_the_broker_comes_up(
    tmp_path: Path,
) -> None:
    port = free_port()
    transport = MqttTransport(
        MqttSettings(port=port, client_id="early", reconnect_min_s=1, reconnect_max_s=2)
    )
    retries = _Retries()
    logging.getLogger("medsplit.transport.mqtt").addHandler(retries)
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            transport.connect()  # retries for ever by default
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    try:
        assert retries.seen.wait(30), "the client never retried"
        assert thread.is_alive() and not errors  # still retrying, not given up
        broker = Mosquitto(tmp_path / "late", port=port).start()
        try:
            thread.join(30)
            assert not thread.is_alive() and not errors
            assert transport.connected
        finally:
            transport.close()
            broker.stop()
    finally:
        logging.getLogger("medsplit.transport.mqtt").removeHandler(retries)
