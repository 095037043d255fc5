"""One federation.yaml, one CA, one broker, several jobs: each party of each job has its own kit
and identity (``party@job``), the ACL keeps jobs apart, and the aggregator chart installs one
broker release and one release per job (rendered with Helm's SDK, checked against Kubernetes'
schema)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from medsplit.cli import main
from medsplit.security.pki import PkiError, common_name, describe_client_certificate
from medsplit.security.pki import read_certificate as certificate
from medsplit.security.provision import Federation, Provisioner
from medsplit.security.seal import parse_roster
from models.config_errors import ConfigError
from tests.unit.test_helm_charts import (
    AGGREGATOR_CHART,
    EDGE_CHART,
    EDGE_SETS,
    _broker_names,
    _merge,
    _render,
    _validated,
)

JOBS = {"tumour": {"sites": ["kings", "leeds"]}, "sepsis": {"sites": ["kings", "york", "hull"]}}


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("consortium")
    federation = Federation.model_validate(
        {"jobs": JOBS, "broker_hosts": ["broker.example"], "helm_namespace": "medsplit"}
    )
    Provisioner.create(federation, out)
    return out


def test_every_party_of_every_job_has_its_own_kit_and_identity(kit: Path) -> None:
    for job, spec in JOBS.items():
        for party in ["aggregator", *spec["sites"]]:
            folder = kit / job / party
            assert common_name(certificate(folder / "cert.pem")) == f"{party}@{job}"
        job_yaml = yaml.safe_load((kit / job / "aggregator" / "job.yaml").read_text())
        assert job_yaml["job_id"] == job
        assert job_yaml["sites"] == spec["sites"]
        roster = parse_roster((kit / job / "aggregator" / "roster.json").read_text(), job)
        assert sorted(roster.sites) == sorted(spec["sites"])
    # A hospital in two jobs holds two kits: different TLS keys and different sealing keys.
    assert (kit / "tumour/kings/key.pem").read_bytes() != (
        kit / "sepsis/kings/key.pem"
    ).read_bytes()
    assert (kit / "tumour/kings/seal.key").read_bytes() != (
        kit / "sepsis/kings/seal.key"
    ).read_bytes()
    site = yaml.safe_load((kit / "sepsis" / "kings" / "site.yaml").read_text())
    assert (site["site_id"], site["job_id"]) == ("kings", "sepsis")


def test_the_acl_grants_each_identity_only_its_own_jobs_topics(kit: Path) -> None:
    blocks: dict[str, list[str]] = {}
    user = ""
    for line in (kit / "mosquitto" / "acl").read_text().splitlines():
        if line.startswith("user "):
            user = line.removeprefix("user ")
            blocks[user] = []
        elif line.startswith("topic "):
            blocks[user].append(line.split()[-1])
    expected = {f"{p}@{j}" for j, s in JOBS.items() for p in ["aggregator", *s["sites"]]}
    assert set(blocks) == expected
    for identity, grants in blocks.items():
        party, job = identity.split("@")
        assert all(g.startswith(f"medsplit/v1/{job}/") for g in grants), identity
        if party != "aggregator":
            assert f"medsplit/v1/{job}/{party}/down/+" in grants
            assert not any(g.startswith(f"medsplit/v1/{job}/+") for g in grants), identity


def test_a_process_accepts_its_job_qualified_certificate_and_no_other(kit: Path) -> None:
    cert = kit / "sepsis" / "kings" / "cert.pem"
    note, _ = describe_client_certificate(cert, "kings", "sepsis")
    assert "kings@sepsis" in note
    with pytest.raises(PkiError, match=r"'kings@sepsis'.*'kings@tumour'"):
        describe_client_certificate(cert, "kings", "tumour")
    with pytest.raises(PkiError, match="is for 'kings@sepsis'"):
        describe_client_certificate(cert, "york", "sepsis")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"job_id": "a", "sites": ["x"], "jobs": JOBS}, "not both"),
        ({"jobs": {}}, "at least one job"),
        ({"jobs": {"mosquitto": {"sites": ["x"]}}}, "reserved"),
        ({"jobs": {"a": {"sites": ["x", "x"]}}}, "repeated"),
        ({"jobs": {"a b": {"sites": ["x"]}}}, "jobs"),
        ({"job_id": "a"}, "job_id and sites"),
    ],
)
def test_a_federation_in_neither_or_both_forms_is_refused(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Federation.model_validate({**fields, "broker_hosts": ["h"]})


def test_revoking_from_one_job_leaves_the_other(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    Provisioner.create(Federation.model_validate({"jobs": JOBS, "broker_hosts": ["h"]}), out)
    kit = Provisioner(out)
    kit.revoke("kings@sepsis")
    acl = (out / "mosquitto" / "acl").read_text()
    assert "user kings@sepsis\n" not in acl
    assert "user kings@tumour\n" in acl
    revoked = json.loads((out / "sepsis" / "aggregator" / "revocations.json").read_text())
    assert revoked["identities"] == ["kings"]
    kept = json.loads((out / "tumour" / "aggregator" / "revocations.json").read_text())
    assert kept["identities"] == []
    assert Provisioner(out).federation.study("sepsis").sites == ("york", "hull")
    # A bare site id leaves every job it is in.
    Provisioner(out).revoke("york")
    assert "york" not in Provisioner(out).federation.study("sepsis").sites
    with pytest.raises(PkiError, match="not a site"):
        Provisioner(out).revoke("kings@sepsis")


def test_a_site_or_a_whole_job_is_added_by_its_qualified_id(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    Provisioner.create(Federation.model_validate({"jobs": JOBS, "broker_hosts": ["h"]}), out)
    with pytest.raises(PkiError, match="PARTY@JOB"):
        Provisioner(out).add_site("bath")
    with pytest.raises(PkiError, match="not in this federation"):
        Provisioner(out).renew("kings@stroke")
    lines = Provisioner(out).add_site("bath@stroke")
    assert any("job stroke's aggregator" in line for line in lines)
    assert common_name(certificate(out / "stroke/aggregator/cert.pem")) == "aggregator@stroke"
    assert "user bath@stroke\n" in (out / "mosquitto" / "acl").read_text()
    Provisioner(out).renew("aggregator@stroke")
    assert Provisioner(out).federation.study("stroke").sites == ("bath",)


def test_the_command_line_provisions_several_jobs_from_federation_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "federation.yaml"
    spec.write_text(yaml.safe_dump({"jobs": JOBS, "broker_hosts": ["127.0.0.1"]}))
    assert main(["provision", "--out", str(tmp_path / "fed"), "--federation", str(spec)]) == 0
    printed = capsys.readouterr().out
    assert "certificate of kings@sepsis" in printed
    assert "certificate of aggregator@tumour" in printed
    assert main(["provision", "--out", str(tmp_path / "fed"), "--add-site", "bath"]) == 2
    assert "PARTY@JOB" in capsys.readouterr().err


def test_helm_installs_one_shared_broker_and_one_release_per_job(kit: Path) -> None:
    helm = kit / "helm"
    broker_values = yaml.safe_load((helm / "broker-values.yaml").read_text())
    broker = list(_validated(_render(AGGREGATOR_CHART, broker_values, "medsplit-broker")))
    workloads = [d for d in broker if d["kind"] in {"Deployment", "StatefulSet"}]
    assert [w["metadata"]["name"] for w in workloads] == ["medsplit-broker-mosquitto"]
    acl = next(d for d in broker if d["metadata"]["name"] == "medsplit-broker-mosquitto")
    assert acl["data"]["acl"] == (kit / "mosquitto" / "acl").read_text()
    assert "medsplit-broker-mosquitto.medsplit.svc" in _broker_names(kit)

    names = {(d["kind"], d["metadata"]["name"]) for d in broker}
    for job in JOBS:
        values = yaml.safe_load((helm / job / "aggregator-values.yaml").read_text())
        documents = list(_validated(_render(AGGREGATOR_CHART, values, f"medsplit-{job}")))
        workloads = [d for d in documents if d["kind"] in {"Deployment", "StatefulSet"}]
        assert [w["metadata"]["name"] for w in workloads] == [f"medsplit-{job}"]
        config = next(d for d in documents if d["metadata"]["name"] == f"medsplit-{job}-job")
        job_yaml = yaml.safe_load(config["data"]["job.yaml"])
        assert job_yaml["broker"]["url"] == "mqtts://medsplit-broker-mosquitto.medsplit.svc:8883"
        assert job_yaml["job_id"] == job
        policy = next(d for d in documents if d["kind"] == "NetworkPolicy")
        reach = [rule["to"][0].get("podSelector") for rule in policy["spec"]["egress"][1:]]
        assert {"matchLabels": values["networkPolicy"]["brokerPodLabels"]} in reach
        mine = {(d["kind"], d["metadata"]["name"]) for d in documents}
        assert not mine & names, "two releases would own the same resource"
        names |= mine
        secret = yaml.safe_load((helm / job / "aggregator-secrets.yaml").read_text())
        assert secret["metadata"]["labels"]["medsplit.io/job"] == job
        assert values["aggregator"]["existingSecret"] == secret["metadata"]["name"]
        for site in JOBS[job]["sites"]:
            site_values = yaml.safe_load((helm / job / f"{site}-values.yaml").read_text())
            edge = _render(EDGE_CHART, _merge(site_values, EDGE_SETS["defaults"]), site)
            site_map = next(d for d in edge if d["kind"] == "ConfigMap")
            assert yaml.safe_load(site_map["data"]["site.yaml"])["job_id"] == job


def test_the_shared_brokers_policy_admits_every_jobs_aggregator(kit: Path) -> None:
    values = yaml.safe_load((kit / "helm" / "broker-values.yaml").read_text())
    values = _merge(values, {"networkPolicy": {"brokerAllowedCIDRs": ["198.51.100.7/32"]}})
    documents = _render(AGGREGATOR_CHART, values, "medsplit-broker")
    policy = next(d for d in documents if d["kind"] == "NetworkPolicy")
    sources = policy["spec"]["ingress"][0]["from"]
    selector = sources[0]["podSelector"]["matchLabels"]
    assert selector == {
        "app.kubernetes.io/name": "medsplit-aggregator",
        "app.kubernetes.io/component": "aggregator",
    }  # any release's aggregator: each job's release labels its pods so


def test_the_single_job_form_keeps_its_layout_and_plain_identities(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    Provisioner.create(Federation(job_id="j", sites=["a"], broker_hosts=["h"]), out)
    assert common_name(certificate(out / "a" / "cert.pem")) == "a"
    with pytest.raises(PkiError, match="one job"):
        Provisioner(out).revoke("a@j")
    with pytest.raises(ConfigError):
        Provisioner(out).add_site("aggregator")
