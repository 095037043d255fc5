"""Mutual TLS against a real Mosquitto that requires client certificates."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from medsplit.brokers.mosquitto import Mosquitto, find_mosquitto
from medsplit.transport import ConnectFailed, MqttSettings, MqttTransport, TlsSettings
from tests.support.certs import CertificateAuthority

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(Path(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="module")
def tls_broker(
    ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mosquitto]:
    server = ca.issue("broker", server=True)
    broker = Mosquitto(
        Path(tmp_path_factory.mktemp("tls-broker")),
        extra_config="\n".join(
            [
                f"cafile {ca.ca_file}",
                f"certfile {server.cert}",
                f"keyfile {server.key}",
                "require_certificate true",
                "use_identity_as_username true",
            ]
        ),
    )
    yield broker.start()
    broker.stop()


def _transport(port: int, tls: TlsSettings, host: str = "localhost") -> MqttTransport:
    return MqttTransport(
        MqttSettings(
            host=host,
            port=port,
            client_id=f"tls-{uuid.uuid4().hex[:8]}",
            tls=tls,
            connect_timeout_s=3,
        )
    )


def test_mutual_tls_round_trip(ca: CertificateAuthority, tls_broker: Mosquitto) -> None:
    site = ca.issue("site-a")
    tls = TlsSettings(ca_file=ca.ca_file, cert_file=site.cert, key_file=site.key)
    with _transport(tls_broker.port, tls) as a, _transport(tls_broker.port, tls) as b:
        b.subscribe("medsplit/v1/j/site-a/up/+")
        a.publish("medsplit/v1/j/site-a/up/x", b"over tls")
        message = b.receive(timeout=10)
        assert message is not None and message.payload == b"over tls"


def test_client_without_certificate_is_refused(
    ca: CertificateAuthority, tls_broker: Mosquitto
) -> None:
    transport = _transport(tls_broker.port, TlsSettings(ca_file=ca.ca_file))
    # Refused at once, although connect() would otherwise retry for ever: no retry can help.
    with pytest.raises(ConnectFailed, match=f"localhost:{tls_broker.port}") as info:
        transport.connect()
    assert info.value.permanent
    transport.close()


def test_broker_signed_by_another_ca_is_refused(
    ca: CertificateAuthority, tls_broker: Mosquitto, tmp_path: Path
) -> None:
    stranger = CertificateAuthority(tmp_path, name="other CA")
    site = ca.issue("site-b")
    tls = TlsSettings(ca_file=stranger.ca_file, cert_file=site.cert, key_file=site.key)
    transport = _transport(tls_broker.port, tls)
    with pytest.raises(ConnectFailed, match="certificate verify failed"):
        transport.connect()
    transport.close()


def test_hostname_must_match_the_broker_certificate(
    ca: CertificateAuthority, tls_broker: Mosquitto
) -> None:
    site = ca.issue("site-c")
    tls = TlsSettings(ca_file=ca.ca_file, cert_file=site.cert, key_file=site.key)
    # The broker's certificate names only "localhost": the same broker reached by IP must fail.
    transport = _transport(tls_broker.port, tls, host="127.0.0.1")
    with pytest.raises(ConnectFailed, match="certificate verify failed"):
        transport.connect()
    transport.close()


def test_username_and_password(tmp_path: Path) -> None:
    passwords = tmp_path / "passwords"
    passwords.write_text("")
    passwd_tool = Path(find_mosquitto()).with_name("mosquitto_passwd")
    if not passwd_tool.exists():
        passwd_tool = Path(shutil.which("mosquitto_passwd") or "mosquitto_passwd")
    subprocess.run([str(passwd_tool), "-b", str(passwords), "site-a", "s3cret"], check=True)
    broker = Mosquitto(tmp_path / "broker", f"password_file {passwords}", anonymous=False).start()
    try:
        url = f"127.0.0.1:{broker.port}"
        good = MqttTransport(MqttSettings.from_url(f"mqtt://site-a:s3cret@{url}", client_id="a"))
        with good:
            assert good.connected
        bad = MqttTransport(MqttSettings.from_url(f"mqtt://site-a:wrong@{url}", client_id="b"))
        refused = r"refused the connection of 'b': (bad user name or password|not authorized)"
        with pytest.raises(ConnectFailed, match=refused) as info:
            bad.connect()
        # The reason code, not the text, tells a refusal from a transient failure.
        assert info.value.not_authorized and info.value.permanent
        assert info.value.reason_code in (0x86, 0x87)
        bad.close()
    finally:
        broker.stop()
