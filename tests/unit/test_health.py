"""The health endpoints probes ask: alive, ready or not and why, and one error shape."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from medsplit.cli import main
from medsplit.health import (
    HealthServer,
    HttpSettings,
    certificate_valid,
    connected,
    start_health,
    writable,
)
from models.config_errors import ConfigError
from tests.support.certs import CertificateAuthority


def test_health_is_off_without_a_port() -> None:
    assert start_health(HttpSettings(), {}, "aggregator") is None


def test_ready_only_when_every_check_passes_and_the_body_says_which_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    transport = SimpleNamespace(connected=False)
    current: list[object] = []
    server = HealthServer(
        HttpSettings(port=0),
        {
            "broker": connected(lambda: current[0] if current else None),
            "checkpoints": writable(tmp_path / "ckpt"),
        },
        "aggregator",
    )
    port = server.start()
    base = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(f"{base}/healthz").json() == {"status": "alive", "process": "aggregator"}
        response = httpx.get(f"{base}/readyz")
        assert response.status_code == 503
        assert response.json()["checks"] == {
            "broker": "not connected to the broker yet",
            "checkpoints": "ok",
        }
        assert main(["probe", "--url", f"{base}/readyz"]) == 1
        assert "broker: not connected to the broker yet" in capsys.readouterr().err

        current.append(transport)
        assert "connection is down" in httpx.get(f"{base}/readyz").json()["checks"]["broker"]
        transport.connected = True
        response = httpx.get(f"{base}/readyz")
        assert response.status_code == 200
        assert response.json()["ready"] is True
        assert main(["probe", "--url", f"{base}/readyz"]) == 0

        metrics = httpx.get(f"{base}/metrics")
        assert metrics.status_code == 200
        families = {f.name for f in text_string_to_metric_families(metrics.text)}
        assert "python_info" in families

        missing = httpx.get(f"{base}/nothing")
        assert missing.status_code == 404
        assert set(missing.json()) == {"error", "reason"}
        post = httpx.post(f"{base}/readyz")
        assert post.status_code == 405
        assert set(post.json()) == {"error", "reason"}
    finally:
        server.stop()
    assert main(["probe", "--url", f"{base}/readyz", "--timeout", "1"]) == 1
    assert "no answer from" in capsys.readouterr().err


def test_a_check_that_raises_is_not_ready_instead_of_breaking_the_endpoint() -> None:
    def broken() -> str | None:
        raise RuntimeError("boom")

    server = HealthServer(HttpSettings(port=0), {"x": broken}, "site-a")
    assert server.readiness() == {"x": "the check failed: boom"}


def test_a_checkpoint_folder_that_takes_no_file_is_not_ready(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    problem = writable(blocker / "checkpoints")()
    assert problem is not None
    assert str(blocker / "checkpoints") in problem
    assert writable(tmp_path / "fine")() is None


def test_a_certificate_about_to_expire_is_not_ready(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)  # issues certificates valid for one day
    cert = ca.issue("site-a").cert
    assert certificate_valid(cert, 0.5)() is None
    problem = certificate_valid(cert, 2)()
    assert problem is not None
    assert "expires in 1.0 days" in problem
    assert certificate_valid(None, 2)() is None  # plaintext on loopback: nothing to expire
    missing = certificate_valid(tmp_path / "none.pem", 1)()
    assert missing is not None
    assert "not found" in missing


def test_a_port_in_use_is_a_config_error_naming_the_field() -> None:
    first = HealthServer(HttpSettings(port=0), {}, "aggregator")
    port = first.start()
    try:
        with pytest.raises(ConfigError, match=r"http\.port: cannot listen on 127\.0\.0\.1:"):
            HealthServer(HttpSettings(port=port), {}, "site-a").start()
    finally:
        first.stop()
