"""Both Helm charts rendered with Helm's own SDK for several value sets, every manifest checked
against the Kubernetes schema (strict), and the chart's broker configuration compared with what
`medsplit provision` generates."""

from __future__ import annotations

import base64
import copy
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from aggregator.config import JobConfig
from edge_agent.config import SiteConfig
from edge_agent.data.settings import VolumeData
from medsplit.cli import main
from medsplit.health import HttpSettings
from medsplit.security import helm_files, mosquitto_files
from medsplit.security.pki import read_certificate
from medsplit.security.provision import Federation, Provisioner

REPO = Path(__file__).resolve().parents[2]
AGGREGATOR_CHART = REPO / "helm" / "medsplit-aggregator"
EDGE_CHART = REPO / "helm" / "medsplit-edge"
SERVE_CHART = REPO / "helm" / "medsplit-serve"
KUBERNETES = kubernetes_validate.latest_version()  # the newest the validator knows (1.37)
WORKLOADS = {"Deployment", "StatefulSet"}


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("federation")
    federation = Federation(
        job_id="trial",
        sites=["hospital-a", "hospital-b"],
        broker_hosts=["broker.hospital-network.example"],
        helm_namespace="medsplit",
    )
    Provisioner.create(federation, out)
    return out


def _values(kit: Path, name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((kit / "helm" / f"{name}-values.yaml").read_text())
    return loaded


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _render(chart: Path, values: dict[str, Any], release: str) -> list[dict[str, Any]]:
    report = helm.lint(str(chart), values, strict=True, kube_version=f"v{KUBERNETES}.0")
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]
    rendered = helm.Chart.load(str(chart)).render(values, name=release, namespace="medsplit")
    documents = []
    for path, text in rendered.items():
        if path.endswith(".yaml"):
            documents += [d for d in yaml.safe_load_all(text) if d]
    return documents


def _validated(documents: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for document in documents:
        if document["kind"] == "ServiceMonitor":  # a CRD: no schema in Kubernetes itself
            assert document["apiVersion"] == "monitoring.coreos.com/v1"
            assert document["spec"]["endpoints"][0]["path"] == "/metrics"
        else:
            kubernetes_validate.validate(document, KUBERNETES, strict=True)
        yield document


AGGREGATOR_SETS = {
    "defaults": {},
    "deployment and an existing claim": {
        "aggregator": {"kind": "Deployment"},
        "persistence": {"existingClaim": "checkpoints"},
    },
    "metrics on": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "network policy off, public broker": {
        "networkPolicy": {"enabled": False},
        "mosquitto": {
            "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["198.51.100.0/24"]}
        },
    },
    "hospitals listed": {
        "networkPolicy": {"brokerAllowedCIDRs": ["198.51.100.7/32", "203.0.113.0/24"]}
    },
    "own registry, no persistence": {
        "global": {"imageRegistry": "registry.hospital.example", "imagePullSecrets": ["pull"]},
        "persistence": {"enabled": False},
        "mosquitto": {"persistence": {"enabled": False}},
    },
}
EDGE_SETS = {
    "defaults": {"data": {"hostPath": "/srv/pacs-export"}},
    "gpu": {
        "data": {"hostPath": "/srv/pacs-export"},
        "gpu": {"enabled": True, "count": 2, "runtimeClassName": "nvidia"},
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "existing claims, csv": {
        "data": {"existingClaim": "ehr", "config": {"source": "csv", "path": "table.csv"}},
        "persistence": {"existingClaim": "state"},
    },
    "a PACS over DICOMweb": {
        "data": {
            "hostPath": "/srv/labels",
            "config": {
                "source": "dicomweb",
                "url": "https://pacs.hospital-a.example/dicom-web",
                "labels": "labels.csv",
                "classes": ["normal", "lesion"],
                "auth": {"username": "medsplit"},
            },
            "pacs": {
                "existingSecret": "pacs-credentials",
                "password": True,
                "clientCertificate": True,
                "ca": True,
                "cidrs": ["198.51.100.15/32"],
            },
        },
    },
    "CT volumes": {
        "data": {
            "hostPath": "/srv/ct-export",
            "config": {
                "source": "volumes",
                "classes": ["normal", "lesion"],
                "preprocessing": {"spacing": [2, 2, 2], "size": [32, 64, 64]},
            },
        },
    },
    "metrics on, network policy off": {
        "data": {"hostPath": "/srv/pacs-export"},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "networkPolicy": {"enabled": False},
    },
}


def _pods(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in documents if d["kind"] in WORKLOADS]


def _assert_hardened(pod: dict[str, Any]) -> None:
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        name = container["name"]
        if name != "mosquitto":  # a finished job's pod must not be restarted into it
            assert container["args"][-2:] == ["--after-finish", "wait"], name
        assert "livenessProbe" in container and "readinessProbe" in container, name
        assert container["resources"]["requests"] and container["resources"]["limits"], name
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert context["runAsUser"] != 0, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"] == {"drop": ["ALL"]}, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name


@pytest.mark.parametrize("case", list(AGGREGATOR_SETS))
def test_the_aggregator_chart_renders_valid_hardened_manifests(kit: Path, case: str) -> None:
    values = _merge(_values(kit, "aggregator"), AGGREGATOR_SETS[case])
    documents = list(_validated(_render(AGGREGATOR_CHART, values, "medsplit-trial")))
    kinds = [d["kind"] for d in documents]
    assert "Secret" not in kinds  # the chart renders none: it mounts the Secrets it is given
    assert kinds.count("PodDisruptionBudget") == 2
    assert ("NetworkPolicy" in kinds) == (case != "network policy off, public broker")
    assert ("ServiceMonitor" in kinds) == (case == "metrics on")
    pods = _pods(documents)
    assert len(pods) == 2  # the aggregator and its broker
    for pod in pods:
        _assert_hardened(pod)
    for workload in (d for d in documents if d["kind"] in WORKLOADS):
        assert workload["spec"]["replicas"] == 1
        assert any(
            k.startswith("checksum/")
            for k in workload["spec"]["template"]["metadata"]["annotations"]
        )


def test_the_broker_runs_the_configuration_and_acl_provision_generates(kit: Path) -> None:
    documents = _render(AGGREGATOR_CHART, _values(kit, "aggregator"), "medsplit-trial")
    config_map = next(
        d
        for d in documents
        if d["metadata"]["name"] == "medsplit-trial-mosquitto" and d["kind"] == "ConfigMap"
    )
    federation = Provisioner(kit).federation
    assert config_map["data"]["acl"] == (kit / "mosquitto" / "acl").read_text()
    assert config_map["data"]["acl"] == mosquitto_files.acl(federation)
    assert config_map["data"]["crl.pem"] == (kit / "mosquitto" / "crl.pem").read_text()
    expected = mosquitto_files.config(federation, helm_files.CONFIG_DIR, helm_files.DATA_DIR)
    assert config_map["data"]["mosquitto.conf"] == expected
    # Every file the configuration names is where the pod mounts it.
    broker = next(d for d in documents if d["kind"] == "Deployment")
    pod = broker["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts == {"config": "/mosquitto/config", "data": "/mosquitto/data"}
    projected = next(v for v in pod["volumes"] if v["name"] == "config")["projected"]["sources"]
    files = {"acl", "crl.pem", "mosquitto.conf"} | {
        i["path"] for i in projected[1]["secret"]["items"]
    }
    for line in expected.splitlines():
        key, _, value = line.partition(" ")
        if key in {"acl_file", "cafile", "certfile", "keyfile", "crlfile"}:
            assert Path(value).parent == Path("/mosquitto/config") and Path(value).name in files, (
                line
            )
    assert f"persistence_location {mounts['data']}/" in expected
    assert f"listener {federation.port}" in expected.splitlines()
    assert pod["containers"][0]["ports"][0]["containerPort"] == federation.port


def test_the_charts_configs_are_ones_the_processes_accept(kit: Path, tmp_path: Path) -> None:
    documents = _render(AGGREGATOR_CHART, _values(kit, "aggregator"), "medsplit-trial")
    job_map = next(d for d in documents if d["metadata"]["name"] == "medsplit-trial-job")
    job = yaml.safe_load(job_map["data"]["job.yaml"])
    assert job["broker"]["url"] == "mqtts://medsplit-trial-mosquitto.medsplit.svc:8883"
    # The broker's certificate names the Service the aggregator connects to.
    assert "medsplit-trial-mosquitto.medsplit.svc" in _broker_names(kit)
    job = _localized(job, kit / "aggregator")
    assert JobConfig.from_mapping(job, "chart job.yaml").job_id == "trial"

    values = _merge(_values(kit, "hospital-a"), EDGE_SETS["defaults"])
    edge = _render(EDGE_CHART, values, "hospital-a")
    site_map = next(d for d in edge if d["kind"] == "ConfigMap")
    site = yaml.safe_load(site_map["data"]["site.yaml"])
    assert site["broker"]["url"] == "mqtts://broker.hospital-network.example:8883"
    assert site["data"]["folder"] == "/data"
    config = SiteConfig.from_mapping(_localized(site, kit / "hospital-a"), "chart site.yaml")
    assert config.site_id == "hospital-a"
    assert config.http.host == "0.0.0.0"


def _localized(config: dict[str, Any], kit: Path) -> dict[str, Any]:
    """The chart's config with the mounted files pointed at the kit's, to validate it here."""
    config = copy.deepcopy(config)
    tls = config["broker"]["tls"]
    for key, path in tls.items():
        tls[key] = str(kit / Path(path).name)
    if "security" in config:
        config["security"]["revocations_file"] = str(kit / "revocations.json")
    return config


@pytest.mark.parametrize("case", list(EDGE_SETS))
def test_the_edge_chart_renders_valid_hardened_manifests(kit: Path, case: str) -> None:
    values = _merge(_values(kit, "hospital-a"), EDGE_SETS[case])
    documents = list(_validated(_render(EDGE_CHART, values, "hospital-a")))
    kinds = [d["kind"] for d in documents]
    assert "Secret" not in kinds
    (pod,) = _pods(documents)
    _assert_hardened(pod)
    container = pod["containers"][0]
    data = next(m for m in container["volumeMounts"] if m["name"] == "data")
    assert data == {"name": "data", "mountPath": "/data", "readOnly": True}
    site = yaml.safe_load(
        next(d for d in documents if d["kind"] == "ConfigMap")["data"]["site.yaml"]
    )
    gpu = container["resources"]["limits"].get("nvidia.com/gpu")
    if case == "gpu":
        assert gpu == 2
        assert site["device"] == "cuda"
        assert pod["runtimeClassName"] == "nvidia"
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        assert gpu is None
        assert site["device"] == "cpu"
    if case == "a PACS over DICOMweb":
        _assert_reads_its_pacs(site, pod, documents)
    if case == "CT volumes":
        config = SiteConfig.from_mapping(_localized(site, kit / "hospital-a"), "site.yaml")
        assert isinstance(config.data, VolumeData) and config.data.folder == Path("/data")
        state = next(m for m in container["volumeMounts"] if m["name"] == "state")
        assert str(config.data.cache_dir).startswith(state["mountPath"])
    if case == "existing claims, csv":
        volume = next(v for v in pod["volumes"] if v["name"] == "data")
        assert volume["persistentVolumeClaim"] == {"claimName": "ehr", "readOnly": True}
        assert site["data"]["path"] == "/data/table.csv"
        assert "PersistentVolumeClaim" not in kinds


def _assert_reads_its_pacs(
    site: dict[str, Any], pod: dict[str, Any], documents: list[dict[str, Any]]
) -> None:
    """The PACS's credentials come from the named Secret's files, its cache lives on the state
    volume, the network policy lets the agent reach the PACS and the agent accepts the config."""
    data = site["data"]
    assert data["labels"] == "/data/labels.csv"
    assert data["cache_dir"] == "/var/lib/medsplit/pacs-cache"
    assert data["auth"] == {
        "username": "medsplit",
        "password_file": "/etc/medsplit/pacs/password",
        "cert_file": "/etc/medsplit/pacs/tls.crt",
        "key_file": "/etc/medsplit/pacs/tls.key",
        "ca_file": "/etc/medsplit/pacs/ca.crt",
    }
    volume = next(v for v in pod["volumes"] if v["name"] == "pacs")
    assert volume["secret"]["secretName"] == "pacs-credentials"
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "pacs")
    assert mount == {"name": "pacs", "mountPath": "/etc/medsplit/pacs", "readOnly": True}
    policy = next(d for d in documents if d["kind"] == "NetworkPolicy")
    assert {
        "ports": [{"port": 443, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "198.51.100.15/32"}}],
    } in policy["spec"]["egress"]
    SiteConfig.from_mapping({**site, "broker": {"url": "mqtt://localhost:1883"}}, "chart site.yaml")


@pytest.mark.parametrize(
    ("chart", "missing"),
    [(AGGREGATOR_CHART, "mosquitto.config is required"), (EDGE_CHART, "site.siteId is required")],
)
def test_no_secret_or_identity_has_a_default(chart: Path, missing: str) -> None:
    extra = {"data": {"hostPath": "/srv"}} if chart == EDGE_CHART else {}
    defaults = yaml.safe_load((chart / "values.yaml").read_text())
    secrets = [v for k, v in _leaves(defaults) if k == "existingSecret"]
    assert secrets and all(v == "" for v in secrets)
    with pytest.raises(helm.HelmRenderError, match=missing):
        helm.Chart.load(str(chart)).render(extra)


def test_the_schema_refuses_a_typo_and_a_second_aggregator_kind(kit: Path) -> None:
    chart = helm.Chart.load(str(AGGREGATOR_CHART))
    with pytest.raises(helm.HelmValuesError, match="StatefulSet"):
        chart.validate_schema({"aggregator": {"kind": "DaemonSet"}})
    with pytest.raises(helm.HelmValuesError, match="networkPolicies"):
        chart.validate_schema({"networkPolicies": {"enabled": False}})
    with pytest.raises(helm.HelmValuesError, match="brokerUrl"):
        helm.Chart.load(str(EDGE_CHART)).validate_schema(
            {"site": {"brokerUrl": "mqtt://plain:1883"}}
        )


def _leaves(tree: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, k)
    else:
        yield key, tree


def test_provision_writes_secrets_the_charts_mount(kit: Path) -> None:
    secrets = list(yaml.safe_load_all((kit / "helm" / "aggregator-secrets.yaml").read_text()))
    assert stat.S_IMODE((kit / "helm" / "aggregator-secrets.yaml").stat().st_mode) == 0o600
    for secret in secrets:
        kubernetes_validate.validate(secret, KUBERNETES, strict=True)
    aggregator, broker = secrets
    assert (
        base64.b64decode(aggregator["data"]["key.pem"])
        == (kit / "aggregator" / "key.pem").read_bytes()
    )
    assert set(broker["data"]) == {"ca.pem", "server.pem", "server.key"}
    values = _values(kit, "aggregator")
    assert values["aggregator"]["existingSecret"] == aggregator["metadata"]["name"]
    assert values["mosquitto"]["existingSecret"] == broker["metadata"]["name"]
    (site,) = yaml.safe_load_all((kit / "helm" / "hospital-b-secret.yaml").read_text())
    assert _values(kit, "hospital-b")["site"]["existingSecret"] == site["metadata"]["name"]
    assert "PRIVATE KEY" not in (kit / "helm" / "aggregator-values.yaml").read_text()


def test_a_renewal_changes_the_checksum_that_rolls_the_pod(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    Provisioner.create(
        Federation(job_id="j", sites=["a", "b"], broker_hosts=["h"], helm_namespace="ns"), out
    )
    before = {s: _values(out, s)["podAnnotations"]["checksum/tls"] for s in ("a", "b")}
    Provisioner(out).renew("a")
    after = {s: _values(out, s)["podAnnotations"]["checksum/tls"] for s in ("a", "b")}
    assert after["a"] != before["a"] and after["b"] == before["b"]
    Provisioner(out).revoke("b")
    assert "user b\n" not in _values(out, "aggregator")["mosquitto"]["acl"]


def test_helm_on_an_existing_folder_renews_the_broker_for_its_service(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    Provisioner.create(Federation(job_id="j", sites=["a"], broker_hosts=["h"]), out)
    assert not (out / "helm").exists()
    lines = Provisioner(out).enable_helm("hospitals")
    assert any("superseded" in line for line in lines)
    assert "medsplit-j-mosquitto.hospitals.svc" in _broker_names(out)
    assert (out / "helm" / "a-values.yaml").is_file()


def _broker_names(out: Path) -> list[str]:
    cert = read_certificate(out / "mosquitto" / "server.pem")
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(names.get_values_for_type(x509.DNSName))


def test_every_chart_takes_its_helpers_from_the_library_chart() -> None:
    library = REPO / "helm" / "medsplit-common"
    assert yaml.safe_load((library / "Chart.yaml").read_text())["type"] == "library"
    defined = re.compile(r'define "([^"]+)"')
    shared = {
        n for tpl in (library / "templates").glob("*.tpl") for n in defined.findall(tpl.read_text())
    }
    assert {"medsplit.fullname", "medsplit.httpProbe", "medsplit.httpSecurityConfig"} <= shared
    for chart in (AGGREGATOR_CHART, EDGE_CHART, SERVE_CHART):
        dependencies = yaml.safe_load((chart / "Chart.yaml").read_text())["dependencies"]
        assert [d["name"] for d in dependencies] == ["medsplit-common"], chart.name
        assert (chart / "charts" / "medsplit-common").resolve() == library.resolve()
        for tpl in (chart / "templates").glob("*.tpl"):  # no chart keeps a copy of its own
            assert not shared & set(defined.findall(tpl.read_text())), tpl


HTTP_SECURITY = {
    "httpSecurity": {
        "tlsSecret": "status-tls",
        "clientCertificates": True,
        "tokenSecret": "status-token",
    },
    "metrics": {"serviceMonitor": {"enabled": True}},
}


@pytest.mark.parametrize("chart", [AGGREGATOR_CHART, EDGE_CHART])
def test_the_http_port_is_guarded_through_the_charts(kit: Path, chart: Path) -> None:
    aggregator = chart == AGGREGATOR_CHART
    base = _values(kit, "aggregator" if aggregator else "hospital-a")
    values = _merge(base, {**HTTP_SECURITY, **({} if aggregator else EDGE_SETS["defaults"])})
    documents = list(_validated(_render(chart, values, "guarded")))
    pod = next(p for p in _pods(documents) if p["containers"][0]["name"] != "mosquitto")
    container = pod["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS", probe
    assert {
        "name": "MEDSPLIT_HTTP__TLS_CERT",
        "value": "/etc/medsplit/http-tls/tls.crt",
    } in container["env"]
    volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert volumes["http-tls"] == "status-tls" and volumes["http-token"] == "status-token"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["http-tls"] == "/etc/medsplit/http-tls"
    config_map = next(
        d
        for d in documents
        if d["kind"] == "ConfigMap"
        and d["metadata"]["name"].endswith(("-job", "guarded-medsplit-edge"))
    )
    config = yaml.safe_load(next(iter(config_map["data"].values())))
    assert config["http"] | {} == {
        "host": "0.0.0.0",
        "port": 8080,
        "ready_cert_days": 3,
        "tls_cert": "/etc/medsplit/http-tls/tls.crt",
        "tls_key": "/etc/medsplit/http-tls/tls.key",
        "tls_client_ca": "/etc/medsplit/http-tls/ca.crt",
        "token_file": "/etc/medsplit/http-token/token",
    }
    assert HttpSettings.model_validate(config["http"]).scheme == "https"  # the process accepts it
    (endpoint,) = next(d for d in documents if d["kind"] == "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["authorization"]["credentials"] == {"name": "status-token", "key": "token"}


SERVE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "agent's node, mutual TLS, metrics": {
        "model": {"agentRelease": "hospital-a", "name": "breast-mlp"},
        "tls": {"existingSecret": "serve-tls", "clientCertificates": True},
        "metrics": {"serviceMonitor": {"enabled": True, "clientSecret": "prometheus-client"}},
    },
    "gpu, own registry": {
        "gpu": {"enabled": True, "runtimeClassName": "nvidia"},
        "global": {"imageRegistry": "registry.hospital.example"},
        "networkPolicy": {
            "ingressFrom": [{"namespaceSelector": {"matchLabels": {"name": "pacs"}}}]
        },
    },
}


@pytest.mark.parametrize("case", list(SERVE_SETS))
def test_the_serving_chart_renders_valid_hardened_manifests(case: str) -> None:
    values = _merge(
        {"model": {"existingClaim": "hospital-a-medsplit-edge-state"}}, SERVE_SETS[case]
    )
    documents = list(_validated(_render(SERVE_CHART, values, "hospital-a-serve")))
    kinds = sorted(d["kind"] for d in documents)
    assert {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= set(kinds)
    assert "Secret" not in kinds
    (pod,) = _pods(documents)
    assert pod["automountServiceAccountToken"] is False
    (init,) = pod["initContainers"]
    assert init["args"][:3] == ["await-model", "--model", "/var/lib/medsplit/state/model.onnx"]
    container = pod["containers"][0]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["runAsNonRoot"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert state["persistentVolumeClaim"] == {
        "claimName": "hospital-a-medsplit-edge-state",
        "readOnly": True,
    }
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    args = container["args"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "grpc": 8081} and "--grpc-port=8081" in args
    policy = next(d for d in documents if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["egress"] == []  # the model is on the volume: nothing to fetch
    if case == "defaults":
        assert "--name=hospital-a-serve" in args and not any(a.startswith("--tls") for a in args)
        assert "affinity" not in pod
    if case == "agent's node, mutual TLS, metrics":
        assert (
            "--name=breast-mlp" in args and "--tls-client-ca=/etc/medsplit/serve-tls/ca.crt" in args
        )
        assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
        affinity = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert (
            affinity[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"]
            == "hospital-a"
        )
        (endpoint,) = next(d for d in documents if d["kind"] == "ServiceMonitor")["spec"][
            "endpoints"
        ]
        assert endpoint["tlsConfig"]["keySecret"] == {"name": "prometheus-client", "key": "tls.key"}
    if case == "gpu, own registry":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and "--device=cuda" in args
        assert container["image"].startswith("registry.hospital.example/medsplit-edge:")


@pytest.mark.parametrize(
    ("chart", "values", "says"),
    [
        (SERVE_CHART, {}, "model.existingClaim is required"),
        (
            SERVE_CHART,
            {"model": {"existingClaim": "c"}, "tls": {"clientCertificates": True}},
            "tls.clientCertificates needs tls.existingSecret",
        ),
        (
            EDGE_CHART,
            {"data": {"hostPath": "/srv"}, "httpSecurity": {"clientCertificates": True}},
            "httpSecurity.clientCertificates needs httpSecurity.tlsSecret",
        ),
        (
            EDGE_CHART,
            {
                "data": {
                    "hostPath": "/srv",
                    "config": {"source": "dicomweb", "labels": "l.csv"},
                    "pacs": {"token": True},
                }
            },
            "data.pacs.existingSecret is required",
        ),
        (
            EDGE_CHART,
            {"data": {"hostPath": "/srv", "config": {"source": "dicomweb"}}},
            "data.config.labels is required for a PACS",
        ),
    ],
)
def test_settings_that_cannot_work_fail_the_render(
    kit: Path, chart: Path, values: dict[str, Any], says: str
) -> None:
    base = _values(kit, "hospital-a") if chart == EDGE_CHART else {}
    with pytest.raises(Exception, match=re.escape(says)):
        helm.Chart.load(str(chart)).render(_merge(base, values), name="r", namespace="medsplit")


def test_provision_helm_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fed"
    args = ["provision", "--out", str(out), "--job", "j", "--sites", "a,b", "--broker-host", "h"]
    assert main([*args, "--helm", "--helm-namespace", "hospitals"]) == 0
    printed = capsys.readouterr().out
    assert f"kubectl apply -n hospitals -f {out / 'helm' / 'aggregator-secrets.yaml'}" in printed
    assert sorted(p.name for p in (out / "helm").iterdir()) == [
        "a-secret.yaml", "a-values.yaml", "aggregator-secrets.yaml", "aggregator-values.yaml",
        "b-secret.yaml", "b-values.yaml",
    ]  # fmt: skip
    assert main(["provision", "--out", str(out), "--add-site", "c"]) == 0
    assert (out / "helm" / "c-values.yaml").is_file()  # every later change keeps helm/ current
