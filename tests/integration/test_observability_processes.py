"""What hospital IT's probes and Prometheus see of real processes over a real Mosquitto.

The aggregator and one agent start before their broker exists: both are alive (``/healthz``)
but not ready (``/readyz`` names the broker) until Mosquitto comes up on their port. After the
job, both processes stay up (``--after-finish wait``), and what ``/metrics`` (parsed with
prometheus_client's own parser) and ``/status`` say is checked against report.json.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

from experiments.federation import Federation, small_job
from medsplit.brokers.mosquitto import Mosquitto, free_port
from medsplit.cli_http import Unanswered, get_json
from tests.support.metrics import Samples, parse_samples

SERVING = ("aggregator", "site-a")  # the processes with an HTTP port; they linger at the end


def _answer(url: str, fed: Federation, until: int, timeout: float = 120) -> Any:
    """The JSON body of ``url`` once it answers with status ``until``; the serving processes
    are checked on every try, so a crash fails at once with its log."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        for name in SERVING:
            assert fed.processes[name].poll() is None, f"{name} exited\n{fed.tail(name)}"
        try:
            code, body = get_json(url, timeout=2)
            if code == until:
                return body
            last = (code, body)
        except Unanswered as exc:  # not listening yet
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer {until} within {timeout:g} s; last: {last}")


def _metrics(url: str) -> Samples:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:  # noqa: S310
        return parse_samples(response.read().decode())


def test_probes_follow_the_broker_and_metrics_and_status_match_the_report(tmp_path: Path) -> None:
    broker_port, aggregator_port, site_port = free_port(), free_port(), free_port()
    job = {**small_job("split-u", "parallel", rounds=2), "http": {"port": aggregator_port}}
    fed = Federation(
        tmp_path,
        f"mqtt://127.0.0.1:{broker_port}",  # nothing listens there yet
        job,
        site_settings={"site-a": {"http": {"port": site_port}}},
    )
    aggregator, site = f"http://127.0.0.1:{aggregator_port}", f"http://127.0.0.1:{site_port}"
    broker = Mosquitto(tmp_path / "broker", port=broker_port)
    try:
        fed.start("aggregator", "--after-finish", "wait")
        fed.start("site-a", "--after-finish", "wait")
        for url in (aggregator, site):
            assert _answer(f"{url}/healthz", fed, 200)["status"] == "alive"  # but not ready
            checks = _answer(f"{url}/readyz", fed, 503)["checks"]
            assert checks["broker"] != "ok", checks
        assert _answer(f"{aggregator}/status", fed, 200)["phase"] == "connecting"

        broker.start()
        for url in (aggregator, site):
            checks = _answer(f"{url}/readyz", fed, 200)["checks"]
            assert set(checks.values()) == {"ok"} and "broker" in checks, checks
        fed.start("site-b")
        assert fed.wait("site-b", 240) == 0, fed.tail("site-b")
        fed.await_file(fed.run_dir / "report.html")  # written after report.json: the run is out
        report = fed.report()
        assert report["status"] == "completed"

        samples = _metrics(aggregator)
        assert samples["medsplit_rounds_completed_total"][()] == len(report["history"]) == 2
        assert samples["medsplit_round_seconds_count"][()] == 2
        assert samples["medsplit_phase"][(("phase", "finished"),)] == 1
        assert samples["medsplit_late_messages_total"][()] == report["late_messages"]
        for name, traffic in report["bytes"].items():
            for direction in ("up", "down"):
                labels = (("direction", direction), ("site", name))
                assert samples["medsplit_site_bytes_total"][labels] == traffic[direction] > 0
            assert samples["medsplit_step_seconds_count"][(("site", name),)] > 0
        rejected = sum(samples.get("medsplit_messages_rejected_total", {}).values())
        assert rejected == sum(report["faults"]["rejected"].values())

        shown = _answer(f"{aggregator}/status", fed, 200)
        assert (shown["job_id"], shown["phase"]) == (job["job_id"], "finished")
        assert [h["round"] for h in shown["history"]] == [h["round"] for h in report["history"]]
        for name, entry in shown["sites"].items():
            assert entry["state"] == "finished"
            assert entry["bytes"] == report["bytes"][name]
            final = report["final"]["sites"][name]
            assert {k: entry["last_metrics"][k] for k in final} == final

        agent = _metrics(site)
        trained = sum("site-a" in h["trained"] for h in report["history"])
        assert agent["medsplit_agent_rounds_trained_total"][()] == trained == 2
        assert agent["medsplit_agent_phase"][(("phase", "finished"),)] == 1
        up = agent["medsplit_agent_bytes_total"][(("direction", "up"),)]
        assert up >= report["bytes"]["site-a"]["up"] > 0  # (its last status came before finish)
        assert _answer(f"{site}/readyz", fed, 200)["checks"] == {"job": "ok"}  # over, lingering

        for name in SERVING:  # lingering: a SIGTERM ends them cleanly
            assert fed.kill(name, signal.SIGTERM) == 0, fed.tail(name)
    finally:
        fed.stop_all()
        if broker.process is not None:
            broker.stop()
