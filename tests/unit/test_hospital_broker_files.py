"""What ``medsplit provision`` writes for a broker inside a hospital: its Mosquitto config and
bridge, the ACLs at both ends, its certificates, the site kits that point at it, and the edge
chart's option that runs it (rendered with Helm's SDK, checked against Kubernetes' schema)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from medsplit.cli import main
from medsplit.security.pki import common_name, read_certificate
from medsplit.security.provision import Federation, Provisioner
from tests.unit.test_helm_charts import (
    EDGE_CHART,
    EDGE_SETS,
    _assert_hardened,
    _merge,
    _pods,
    _render,
    _validated,
)

JOBS = {"tumour": {"sites": ["kings", "leeds"]}, "sepsis": {"sites": ["kings", "york"]}}
BRIDGED = {"kings": {"hosts": ["mqtt.kings.nhs.example"], "remote": "gateway.example:443"}}


def _provision(out: Path, **extra: Any) -> Provisioner:
    spec = {"jobs": JOBS, "broker_hosts": ["central.example"], "hospital_brokers": BRIDGED}
    return Provisioner.create(Federation.model_validate({**spec, **extra}), out)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bridged") / "fed"
    _provision(out, helm_namespace="medsplit")
    return out


def _bridge_topics(config: str) -> tuple[set[str], set[str]]:
    out = {line.split()[1] for line in config.splitlines() if line.endswith(" out 1")}
    into = {line.split()[1] for line in config.splitlines() if line.endswith(" in 1")}
    return out, into


def _grants(acl: str, user: str) -> set[str]:
    grants: dict[str, set[str]] = {}
    current = ""
    for line in acl.splitlines():
        if line.startswith("user "):
            current = line.removeprefix("user ")
        elif line.startswith("topic "):
            grants.setdefault(current, set()).add(line.split(maxsplit=2)[2])
    return grants.get(user, set())


def test_the_bridge_carries_exactly_the_hospitals_topics_in_every_job(kit: Path) -> None:
    config = (kit / "bridges" / "kings" / "mosquitto.conf").read_text()
    out, into = _bridge_topics(config)
    for job in ("tumour", "sepsis"):
        root = f"medsplit/v1/{job}"
        assert f"{root}/kings/up/done" in out and f"{root}/kings/presence" in out
        assert into >= {f"{root}/kings/down/+", f"{root}/all/+", f"{root}/aggregator/presence"}
    for topic in out | into:
        assert "+/" not in topic and "#" not in topic, topic  # nothing of another hospital
        assert "/kings/" in topic or "/all/" in topic or topic.endswith("/aggregator/presence")
    assert "address gateway.example:443" in config
    assert "cleansession false" in config  # what waits while the link is down is kept


def test_both_ends_grant_the_bridge_and_the_agents_no_more_than_the_site(kit: Path) -> None:
    central = (kit / "mosquitto" / "acl").read_text()
    hospital = (kit / "bridges" / "kings" / "acl").read_text()
    for job in ("tumour", "sepsis"):
        assert _grants(hospital, f"kings@{job}") == _grants(central, f"kings@{job}")
    bridge = _grants(central, "bridge:kings")
    own = _grants(central, "kings@tumour") | _grants(central, "kings@sepsis")
    assert bridge == own
    assert not [user for user in ("leeds@tumour", "york@sepsis") if _grants(hospital, user)]


def test_the_hospital_broker_and_its_bridge_have_their_own_certificates(kit: Path) -> None:
    folder = kit / "bridges" / "kings"
    server, bridge = (
        read_certificate(folder / "server.pem"),
        read_certificate(folder / "bridge.pem"),
    )
    assert common_name(server) == "broker:kings"
    assert common_name(bridge) == "bridge:kings"
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mqtt.kings.nhs.example" in names.get_values_for_type(x509.DNSName)
    assert "medsplit-kings-broker.medsplit.svc" in names.get_values_for_type(x509.DNSName)
    usage = bridge.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
    for job in ("tumour", "sepsis"):  # both of the hospital's agents connect to it
        site = yaml.safe_load((kit / job / "kings" / "site.yaml").read_text())
        assert site["broker"]["url"] == "mqtts://mqtt.kings.nhs.example:8883"
    other = yaml.safe_load((kit / "tumour" / "leeds" / "site.yaml").read_text())
    assert other["broker"]["url"] == "mqtts://central.example:8883"


def test_the_command_line_says_where_the_hospital_broker_is_and_how_to_start_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "federation.yaml"
    spec.write_text(
        yaml.safe_dump({"jobs": JOBS, "broker_hosts": ["c"], "hospital_brokers": BRIDGED})
    )
    out = tmp_path / "fed"
    assert main(["provision", "--out", str(out), "--federation", str(spec)]) == 0
    printed = capsys.readouterr().out
    assert f"mosquitto -c {out / 'bridges' / 'kings' / 'mosquitto.conf'}" in printed
    assert main(["provision", "--out", str(out), "--renew", "broker:kings"]) == 0
    assert "new certificate for broker:kings" in capsys.readouterr().out


def test_renewing_the_bridge_and_revoking_the_hospital(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    _provision(out)
    before = (out / "bridges" / "kings" / "bridge.pem").read_bytes()
    Provisioner(out).renew("bridge:kings")
    assert (out / "bridges" / "kings" / "bridge.pem").read_bytes() != before
    Provisioner(out).revoke("kings")  # every job: the hospital leaves, and its broker's grants
    federation = Provisioner(out).federation
    assert federation.hospital_brokers == {}
    assert "bridge:kings" not in (out / "mosquitto" / "acl").read_text()


@pytest.mark.parametrize(
    ("brokers", "message"),
    [
        ({"bath": {}}, "bath is in no job"),
        ({"kings": {"remote": "no-port"}}, "remote"),
        ({"kings": {"hosts": []}}, "hosts"),
    ],
)
def test_a_hospital_broker_that_cannot_work_is_refused(
    brokers: dict[str, Any], message: str
) -> None:
    spec = {"jobs": JOBS, "broker_hosts": ["c"], "hospital_brokers": brokers}
    with pytest.raises(ValueError, match=message):
        Federation.model_validate(spec)


def test_the_edge_chart_runs_the_hospital_broker_and_points_the_agents_at_it(kit: Path) -> None:
    helm = kit / "helm"
    first = yaml.safe_load((helm / "tumour" / "kings-values.yaml").read_text())
    documents = list(
        _validated(_render(EDGE_CHART, _merge(first, EDGE_SETS["defaults"]), "kings-tumour"))
    )
    pods = _pods(documents)
    assert len(pods) == 2  # the agent and the hospital broker
    for pod in pods:
        if pod["containers"][0]["name"] != "mosquitto":
            _assert_hardened(pod)
        else:
            assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    config = next(d for d in documents if d["metadata"]["name"] == "medsplit-kings-broker")
    assert config["data"]["acl"] == (kit / "bridges" / "kings" / "acl").read_text()
    assert "bridge_certfile /mosquitto/config/bridge.pem" in config["data"]["mosquitto.conf"]
    site_map = next(d for d in documents if d["kind"] == "ConfigMap" and "site.yaml" in d["data"])
    url = yaml.safe_load(site_map["data"]["site.yaml"])["broker"]["url"]
    assert url == "mqtts://medsplit-kings-broker.medsplit.svc:8883"
    policies = {d["metadata"]["name"]: d for d in documents if d["kind"] == "NetworkPolicy"}
    egress = policies["medsplit-kings-broker"]["spec"]["egress"]
    assert egress[1]["ports"] == [{"port": 443, "protocol": "TCP"}]  # the bridge, outbound only

    # The hospital's agent of its other job reaches the same broker, and runs none of its own.
    second = yaml.safe_load((helm / "sepsis" / "kings-values.yaml").read_text())
    assert "hospitalBroker" not in second
    other = list(
        _validated(_render(EDGE_CHART, _merge(second, EDGE_SETS["defaults"]), "kings-sepsis"))
    )
    assert len(_pods(other)) == 1
    agent_policy = next(d for d in other if d["kind"] == "NetworkPolicy")
    selector = agent_policy["spec"]["egress"][1]["to"][0]["podSelector"]["matchLabels"]
    assert selector == {"medsplit.io/hospital-broker": "medsplit-kings-broker"}
    broker = next(d for d in documents if d["metadata"]["name"] == "medsplit-kings-broker"
                  and d["kind"] == "Deployment")  # fmt: skip
    labels = broker["spec"]["template"]["metadata"]["labels"]
    assert labels["medsplit.io/hospital-broker"] == "medsplit-kings-broker"
    secrets = list(yaml.safe_load_all((helm / "tumour" / "kings-secret.yaml").read_text()))
    assert first["hospitalBroker"]["existingSecret"] in [s["metadata"]["name"] for s in secrets]
