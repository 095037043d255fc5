"""Isolation, refusal and revocation on a real Mosquitto started from `medsplit provision`'s
own configuration, with the certificates it issued.

Every "cannot" is checked as "never arrived": after the forbidden message, a permitted one
goes the same way, and once it has arrived nothing else may have.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from medsplit.brokers.mosquitto import Mosquitto, free_port
from medsplit.security.pki import CertificateAuthority, now
from medsplit.security.provision import Federation, Provisioner
from medsplit.transport import ConnectFailed, MqttSettings, MqttTransport, TlsSettings
from medsplit.transport.base import Inbound, TransportError
from tests.support.certs import CertificateAuthority as ForeignCA

pytestmark = pytest.mark.integration
JOB = "secure-job"
ROOT = f"medsplit/v1/{JOB}"


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[tuple[Provisioner, Mosquitto]]:
    port = free_port()
    spec = Federation(
        job_id=JOB,
        sites=["a", "b"],
        broker_hosts=["127.0.0.1"],
        port=port,
        bind_address="127.0.0.1",
        broker_user=getpass.getuser(),
    )
    kit = Provisioner.create(spec, tmp_path / "fed")
    broker = Mosquitto.provisioned(kit.out / "mosquitto", port).start()
    yield kit, broker
    broker.stop()


def _tls(folder: Path, cert: Path | None = None, key: Path | None = None) -> TlsSettings:
    return TlsSettings(
        ca_file=folder / "ca.pem",
        cert_file=cert or folder / "cert.pem",
        key_file=key or folder / "key.pem",
    )


def _client(broker: Mosquitto, tls: TlsSettings | None) -> MqttTransport:
    settings = MqttSettings(
        host="127.0.0.1",
        port=broker.port,
        client_id=f"t-{uuid.uuid4().hex[:8]}",
        tls=tls,
        connect_timeout_s=5,
        retry_for_s=1,
    )
    transport = MqttTransport(settings)
    transport.connect()
    return transport


def _as(kit: Provisioner, broker: Mosquitto, identity: str) -> MqttTransport:
    return _client(broker, _tls(kit.out / identity))


def _until(receiver: MqttTransport, sentinel: bytes) -> list[Inbound]:
    """Everything ``receiver`` gets up to and including ``sentinel``."""
    got: list[Inbound] = []
    while not got or got[-1].payload != sentinel:
        message = receiver.receive(10)
        assert message is not None, f"the permitted message {sentinel!r} never arrived"
        got.append(message)
    return got


def _try_publish(sender: MqttTransport, topic: str, payload: bytes) -> None:
    """Publish where the ACL forbids it: the broker may refuse or silently drop it."""
    with contextlib.suppress(TransportError):
        sender.publish(topic, payload)


def test_a_site_reads_and_writes_only_its_own_topics(
    federation: tuple[Provisioner, Mosquitto],
) -> None:
    kit, broker = federation
    aggregator, a, b = (_as(kit, broker, who) for who in ("aggregator", "a", "b"))
    aggregator.subscribe(f"{ROOT}/+/up/+")
    b.subscribe(f"{ROOT}/b/down/+")
    b.subscribe(f"{ROOT}/all/+")
    for snoop in (f"{ROOT}/b/down/+", f"{ROOT}/+/down/+", f"{ROOT}/#", "#", f"{ROOT}/+/up/+"):
        with contextlib.suppress(TransportError):  # granted, then every delivery is filtered
            a.subscribe(snoop)
    a.subscribe(f"{ROOT}/a/down/+")

    # What the aggregator sends b never reaches a, whatever a subscribed to.
    aggregator.publish(f"{ROOT}/b/down/finish", b"b's final model")
    aggregator.publish(f"{ROOT}/a/down/train", b"for a")
    assert [m.payload for m in _until(a, b"for a")] == [b"for a"]
    assert [m.payload for m in _until(b, b"b's final model")] == [b"b's final model"]

    # a cannot put anything on b's uplink nor on the broadcast.
    _try_publish(a, f"{ROOT}/b/up/done", b"forged done")
    _try_publish(a, f"{ROOT}/all/train", b"forged broadcast")
    _try_publish(a, f"{ROOT}/aggregator/presence", b"forged presence")
    a.publish(f"{ROOT}/a/up/done", b"a's own done")
    got = _until(aggregator, b"a's own done")
    assert [(m.topic, m.payload) for m in got] == [(f"{ROOT}/a/up/done", b"a's own done")]
    aggregator.publish(f"{ROOT}/all/setup", b"real broadcast")
    assert [m.payload for m in _until(b, b"real broadcast")] == [b"real broadcast"]
    for transport in (aggregator, a, b):
        transport.close()


def test_foreign_expired_plaintext_and_certificate_less_clients_are_refused(
    federation: tuple[Provisioner, Mosquitto], tmp_path: Path
) -> None:
    kit, broker = federation
    foreign = ForeignCA(tmp_path / "foreign").issue("a")
    ca = CertificateAuthority(kit.out / "ca")
    key, cert = ca.issue("a", "site", 1, not_after=now() - datetime.timedelta(hours=1))
    (tmp_path / "expired.pem").write_bytes(cert)
    (tmp_path / "expired.key").write_bytes(key)
    ca_only = TlsSettings(ca_file=kit.out / "a" / "ca.pem")
    cases = {
        "another CA": _tls(kit.out / "a", foreign.cert, foreign.key),
        "expired": _tls(kit.out / "a", tmp_path / "expired.pem", tmp_path / "expired.key"),
        "no client certificate": ca_only,
        "plaintext": None,
    }
    for tls in cases.values():
        with pytest.raises(ConnectFailed):
            _client(broker, tls)
    _as(kit, broker, "a").close()  # and the broker still serves the federation


def test_revocation_and_renewal_take_effect_without_restarting_the_broker(
    federation: tuple[Provisioner, Mosquitto],
) -> None:
    kit, broker = federation
    pid = broker.process.pid if broker.process else None
    aggregator, a, b = (_as(kit, broker, who) for who in ("aggregator", "a", "b"))
    b.subscribe(f"{ROOT}/b/down/+")
    a.subscribe(f"{ROOT}/a/down/+")
    old_a = _tls(kit.out / "a")
    old_a_files = (old_a.cert_file, old_a.key_file)
    saved = {p: p.read_bytes() for p in old_a_files if p is not None}

    kit.revoke("b")
    kit.renew("a")
    broker.reload()  # returns once Mosquitto says it re-read its ACL and CRL
    assert broker.process is not None and broker.process.pid == pid

    # b's open connection is cut off by the new ACL, and b cannot connect again (CRL).
    aggregator.publish(f"{ROOT}/b/down/train", b"for revoked b")
    aggregator.publish(f"{ROOT}/a/down/train", b"for a")
    assert [m.payload for m in _until(a, b"for a")] == [b"for a"]
    assert b.receive(1.0) is None
    with pytest.raises(ConnectFailed):
        _as(kit, broker, "b")
    # a's renewed certificate works; the one it replaced no longer does.
    _as(kit, broker, "a").close()
    old = kit.out.parent / "old-a"
    old.mkdir()
    (old / "ca.pem").write_bytes((kit.out / "a" / "ca.pem").read_bytes())
    for path, data in saved.items():
        (old / path.name).write_bytes(data)
    with pytest.raises(ConnectFailed):
        _client(broker, _tls(old))
    for transport in (aggregator, a, b):
        transport.close()
