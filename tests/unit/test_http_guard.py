"""The aggregator's and agents' HTTP port guarded: HTTPS, a client certificate or a bearer
token for the page, /status and /metrics, the probes open to anyone, and bad settings refused
naming the field."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from medsplit.cli import main
from medsplit.health import HealthServer, HttpSettings
from models.config_errors import ConfigError
from tests.support.certs import CertificateAuthority

TOKEN = "s3cret-token-of-the-federation"  # noqa: S105 (a test token)
PAGE = b"<!doctype html><title>status</title>"


@contextmanager
def _serving(settings: HttpSettings) -> Iterator[str]:
    server = HealthServer(
        settings, {"job": lambda: None}, "aggregator", pages={"/": ("text/html", PAGE)}
    )
    server.status = lambda: {"job_id": "j-1", "phase": "training"}
    port = server.start()
    try:
        yield f"{settings.scheme}://localhost:{port}"
    finally:
        server.stop()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def test_a_token_opens_the_page_status_and_metrics_and_the_probes_stay_open(
    token_file: Path,
) -> None:
    with _serving(HttpSettings(port=0, token_file=token_file)) as base:
        for path in ("/healthz", "/readyz"):
            assert httpx.get(f"{base}{path}").status_code == 200
        for path in ("/", "/status", "/metrics"):
            refused = httpx.get(f"{base}{path}")
            assert refused.status_code == 401, path
            assert "needs a bearer token" in refused.json()["reason"]
            assert refused.headers["www-authenticate"].startswith("Bearer")
            wrong = httpx.get(f"{base}{path}", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            shown = httpx.get(f"{base}{path}", headers={"Authorization": f"Bearer {TOKEN}"})
            assert shown.status_code == 200, path
        assert httpx.get(f"{base}/?token=wrong").status_code == 401
        with httpx.Client(
            base_url=base, follow_redirects=True
        ) as browser:  # a browser opens /?token=... once
            opened = browser.get(f"/?token={TOKEN}")
            assert opened.status_code == 200 and opened.content == PAGE
            assert "token" not in str(opened.url)  # redirected off the address bar
            assert "HttpOnly" in opened.history[0].headers["set-cookie"]
            assert browser.get("/status").json()["job_id"] == "j-1"  # the page's own fetch


def test_https_with_client_certificates_and_open_probes(
    tmp_path: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEDSPLIT_HTTP__TLS_CERT", raising=False)  # the probe pins what it is told
    ca = CertificateAuthority(tmp_path)
    server_id, client_id = ca.issue("localhost", server=True), ca.issue("monitoring")
    other = CertificateAuthority(tmp_path / "other", "someone else's CA").issue("intruder")
    settings = HttpSettings(
        port=0,
        tls_cert=server_id.cert,
        tls_key=server_id.key,
        tls_client_ca=ca.ca_file,
        token_file=token_file,
    )
    anonymous = ssl.create_default_context(cafile=ca.ca_file)
    certified = ssl.create_default_context(cafile=ca.ca_file)
    certified.load_cert_chain(client_id.cert, client_id.key)
    foreign = ssl.create_default_context(cafile=ca.ca_file)
    foreign.load_cert_chain(other.cert, other.key)
    with _serving(settings) as base:
        assert base.startswith("https://")
        assert httpx.get(f"{base}/readyz", verify=anonymous).status_code == 200  # the kubelet
        refused = httpx.get(f"{base}/status", verify=anonymous)
        assert refused.status_code == 401
        assert "a bearer token or a client certificate" in refused.json()["reason"]
        assert httpx.get(f"{base}/status", verify=certified).json()["phase"] == "training"
        token = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{base}/metrics", verify=anonymous, headers=token).status_code == 200
        with pytest.raises(httpx.TransportError):  # a certificate from another CA: no handshake
            httpx.get(f"{base}/healthz", verify=foreign)
        with pytest.raises(httpx.TransportError):  # plaintext to the TLS port
            httpx.get(base.replace("https://", "http://") + "/healthz")
        port = base.rsplit(":", 1)[1]
        probe = ["probe", "--url", f"https://127.0.0.1:{port}/readyz"]
        assert main([*probe, "--cert-file", str(server_id.cert)]) == 0  # its own, pinned
        assert main([*probe, "--cert-file", str(client_id.cert)]) == 1  # another: no handshake
        assert main(probe) == 2  # nothing to pin
        status = ["status", "--url", base, "--ca-file", str(ca.ca_file)]
        assert main([*status, "--cert", str(client_id.cert), "--key", str(client_id.key)]) == 0
        assert main([*status, "--token-file", str(token_file)]) == 0
        assert main(status) == 1  # 401 without credentials


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"tls_cert": "c.pem"}, "tls_cert and tls_key go together"),
        ({"tls_client_ca": "ca.pem"}, "tls_client_ca needs tls_cert and tls_key"),
    ],
)
def test_tls_settings_that_cannot_work_are_refused(fields: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        HttpSettings(port=0, **fields)


def test_a_missing_or_weak_token_file_is_refused_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "short").write_text("abc")
    for path, says in [(tmp_path / "absent", "No such file"), (tmp_path / "short", "at least 16")]:
        with pytest.raises(ConfigError, match=says) as refused:
            HealthServer(HttpSettings(port=0, token_file=path), {}, "agent").start()
        assert "http.token_file" in str(refused.value)
