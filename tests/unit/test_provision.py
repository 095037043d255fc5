"""``medsplit provision``: the kits, the ACL, and adding, renewing and revoking."""

from __future__ import annotations

import datetime
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509

from medsplit.cli import main
from medsplit.config import BrokerConfig
from medsplit.security.pki import (
    CertificateAuthority,
    PkiError,
    common_name,
    describe_client_certificate,
    now,
    read_certificate,
)
from medsplit.security.provision import Federation, Provisioner
from medsplit.security.revocation import RevocationWatch, read_revocations
from medsplit.security.seal import Roster, SealKeys, ca_public_key, verify_roster
from medsplit.wiring import mqtt_connector
from models.config_errors import ConfigError


def _federation(**overrides: object) -> Federation:
    fields: dict[str, object] = {
        "job_id": "job-s",
        "sites": ["a", "b"],
        "broker_hosts": ["localhost", "127.0.0.1"],
        "port": 8884,
    }
    return Federation.model_validate({**fields, **overrides})


@pytest.fixture
def kit(tmp_path: Path) -> Provisioner:
    return Provisioner.create(_federation(), tmp_path / "fed")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_participant_gets_a_kit_signed_by_the_ca(kit: Provisioner) -> None:
    out = kit.out
    ca = read_certificate(out / "ca" / "ca.pem")
    for identity, folder, name in [
        ("broker", "mosquitto", "server"),
        ("aggregator", "aggregator", "cert"),
        ("a", "a", "cert"),
        ("b", "b", "cert"),
    ]:
        cert = read_certificate(out / folder / f"{name}.pem")
        assert common_name(cert) == identity
        cert.verify_directly_issued_by(ca)
        key = out / folder / ("server.key" if name == "server" else "key.pem")
        assert _mode(key) == 0o600, key
        assert (out / folder / "ca.pem").read_bytes() == (out / "ca" / "ca.pem").read_bytes()
    assert _mode(out / "ca" / "ca.key") == 0o600
    server = read_certificate(out / "mosquitto" / "server.pem")
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 29 < lifetime.days <= 30  # short-lived by default


def test_the_config_fragments_load_and_point_at_the_kit(kit: Provisioner) -> None:
    from edge_agent.config import SiteConfig  # noqa: PLC0415

    site = SiteConfig.from_yaml(kit.out / "a" / "site.yaml")
    assert (site.site_id, site.job_id) == ("a", "job-s")
    assert site.broker.url == "mqtts://localhost:8884"
    assert site.broker.tls is not None and site.broker.tls.cert_file == kit.out / "a" / "cert.pem"
    settings = site.broker.settings("x")
    assert settings.tls is not None and settings.port == 8884


def test_the_acl_grants_each_identity_only_its_own_topics(kit: Provisioner) -> None:
    acl = (kit.out / "mosquitto" / "acl").read_text()
    blocks = {
        block.splitlines()[0].removeprefix("user "): block.splitlines()[1:]
        for block in acl.split("\n\n")
        if block.startswith("user ")
    }
    assert set(blocks) == {"aggregator", "a", "b"}
    uplink = ["activations", "aligned", "done", "error", "eval-activations", "finished", "hello"]
    uplink += ["metrics", "stats", "trunk-grad"]
    assert blocks["a"] == [
        *(f"topic write medsplit/v1/job-s/a/up/{kind}" for kind in uplink),
        "topic write medsplit/v1/job-s/a/presence",
        "topic read medsplit/v1/job-s/a/down/+",
        "topic read medsplit/v1/job-s/all/+",
        "topic read medsplit/v1/job-s/aggregator/presence",
    ]
    assert all("#" not in line for lines in blocks.values() for line in lines)
    assert not any(line.startswith("topic") for line in acl.split("\n\nuser")[0].splitlines())
    conf = (kit.out / "mosquitto" / "mosquitto.conf").read_text().splitlines()
    for line in [
        "require_certificate true",
        "use_identity_as_username true",
        "set_tcp_nodelay true",
        "max_packet_size 1048576",
        "allow_anonymous false",
        "persistence true",
        f"crlfile {kit.out / 'mosquitto' / 'crl.pem'}",
        "listener 8884",
    ]:
        assert line in conf


def test_a_second_provisioning_never_overwrites_the_ca(kit: Provisioner) -> None:
    key = (kit.out / "ca" / "ca.key").read_bytes()
    with pytest.raises(PkiError, match="already provisioned"):
        Provisioner.create(_federation(), kit.out)
    assert (kit.out / "ca" / "ca.key").read_bytes() == key


def test_adding_a_site_leaves_the_others_certificates_alone(kit: Provisioner) -> None:
    before = {s: (kit.out / s / "cert.pem").read_bytes() for s in ("a", "b", "aggregator")}
    kit.add_site("c")
    assert {s: (kit.out / s / "cert.pem").read_bytes() for s in before} == before
    assert "user c\n" in (kit.out / "mosquitto" / "acl").read_text()
    assert Provisioner(kit.out).federation.sites == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="repeated: c"):
        kit.add_site("c")


def test_renewing_supersedes_the_old_certificate_but_keeps_the_identity(kit: Provisioner) -> None:
    old = read_certificate(kit.out / "a" / "cert.pem")
    kit.renew("a")
    new = read_certificate(kit.out / "a" / "cert.pem")
    assert new.serial_number != old.serial_number and common_name(new) == "a"
    crl = x509.load_pem_x509_crl((kit.out / "mosquitto" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(old.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(new.serial_number) is None
    assert read_revocations(kit.out / "aggregator" / "revocations.json") == []
    assert "user a\n" in (kit.out / "mosquitto" / "acl").read_text()


def test_revoking_a_site_updates_crl_acl_and_the_aggregator_list(kit: Provisioner) -> None:
    serial = read_certificate(kit.out / "b" / "cert.pem").serial_number
    kit.revoke("b")
    crl = x509.load_pem_x509_crl((kit.out / "mosquitto" / "crl.pem").read_bytes())
    ca = read_certificate(kit.out / "ca" / "ca.pem")
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert "user b" not in (kit.out / "mosquitto" / "acl").read_text()
    assert read_revocations(kit.out / "aggregator" / "revocations.json") == ["b"]
    with pytest.raises(PkiError, match="not a site"):
        kit.revoke("aggregator")


def test_bad_federations_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        _federation(sites=["a", "mosquitto"])
    with pytest.raises(ValueError, match="repeated: a"):
        _federation(sites=["a", "a"])
    path = tmp_path / "federation.yaml"
    path.write_text("job_id: j\nsites: [a]\n")
    assert main(["provision", "--federation", str(path), "--out", str(tmp_path / "o")]) == 2


def test_the_command_line_provisions_then_refuses_to_do_it_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["provision", "--out", str(tmp_path / "f"), "--job", "j", "--sites", "a,b"]
    args += ["--broker-host", "localhost"]
    assert main(args) == 0
    assert "mosquitto -c" in capsys.readouterr().out
    assert main(args) == 2
    assert "already provisioned" in capsys.readouterr().err
    assert main(["provision", "--out", str(tmp_path / "f"), "--revoke", "a"]) == 0
    assert read_revocations(tmp_path / "f" / "aggregator" / "revocations.json") == ["a"]


def test_a_plaintext_broker_needs_insecure_said_out_loud() -> None:
    with pytest.raises(ConfigError, match=r"broker\.tls: mqtt://h:1883 would be plaintext"):
        BrokerConfig(url="mqtt://h:1883").settings("c")
    assert BrokerConfig(url="mqtt://h:1883", insecure=True).settings("c").tls is None
    with pytest.raises(ValueError, match="insecure: true contradicts TLS"):
        BrokerConfig(url="mqtts://h:8883", insecure=True)


def test_the_revocation_watch_follows_the_file_and_keeps_the_last_good_list(
    tmp_path: Path,
) -> None:
    path = tmp_path / "revocations.json"
    path.write_text(json.dumps({"identities": []}))
    now = [0.0]
    watch = RevocationWatch(path, interval_s=1.0, clock=lambda: now[0])
    assert watch.poll() == frozenset()
    path.write_text(json.dumps({"identities": ["b"]}))
    assert watch.poll() == frozenset()  # not checked again before the interval
    now[0] = 1.0
    assert watch.poll() == {"b"}
    path.write_text("{not json")
    now[0] = 2.0
    assert watch.poll() == {"b"}
    path.write_text(json.dumps({"identities": ["a/+"]}))
    now[0] = 3.0
    assert watch.poll() == {"b"}


def test_a_process_refuses_another_identitys_or_an_expired_certificate(
    kit: Provisioner,
) -> None:
    tls = {"ca_file": kit.out / "a" / "ca.pem"}
    a_kit = {**tls, "cert_file": kit.out / "a" / "cert.pem", "key_file": kit.out / "a" / "key.pem"}
    broker = BrokerConfig(url="mqtts://h:8883", tls=a_kit)
    mqtt_connector(broker, "a")  # its own certificate: fine
    with pytest.raises(ConfigError, match="the certificate is for 'a', this process is 'b'"):
        mqtt_connector(broker, "b")
    note, warn = describe_client_certificate(kit.out / "a" / "cert.pem", "a")
    assert "valid until" in note and not warn
    ca = CertificateAuthority(kit.out / "ca")
    for days, expected in [(3, "renew it"), (-1, "expired")]:
        _, cert = ca.issue("a", "site", 1, not_after=now() + datetime.timedelta(days=days))
        path = kit.out / f"a-{days}.pem"
        path.write_bytes(cert)
        if days > 0:
            note, warn = describe_client_certificate(path, "a")
            assert warn and expected in note
        else:
            with pytest.raises(PkiError, match=expected):
                describe_client_certificate(path, "a")


def _roster(kit: Provisioner) -> Roster:
    ca = ca_public_key(kit.out / "ca" / "ca.pem")
    return verify_roster((kit.out / "aggregator" / "roster.json").read_text(), ca, "job-s")


def test_each_site_gets_sealing_keys_apart_from_tls_and_the_roster_lists_them(
    kit: Provisioner,
) -> None:
    roster = _roster(kit)
    assert set(roster.sites) == {"a", "b"}
    for site in ("a", "b"):
        path = kit.out / site / "seal.key"
        assert _mode(path) == 0o600
        keys = SealKeys.load(site, path)
        assert roster.keys_of(site).same_as(keys.public())
        assert b"BEGIN" in (kit.out / site / "key.pem").read_bytes()  # the TLS key is another
        assert path.read_bytes() != (kit.out / site / "key.pem").read_bytes()
    from edge_agent.config import SiteConfig  # noqa: PLC0415

    site = SiteConfig.from_yaml(kit.out / "a" / "site.yaml")
    assert site.sealing.key_file == kit.out / "a" / "seal.key"
    assert site.sealing_ca == kit.out / "a" / "ca.pem"


def test_renewing_keeps_the_seal_keys_and_revoking_takes_the_site_off_the_roster(
    kit: Provisioner,
) -> None:
    before = (kit.out / "a" / "seal.key").read_bytes()
    kit.renew("a")
    kit.add_site("c")
    assert (kit.out / "a" / "seal.key").read_bytes() == before
    assert set(_roster(kit).sites) == {"a", "b", "c"}
    kit.revoke("b")
    assert set(_roster(kit).sites) == {"a", "c"}
