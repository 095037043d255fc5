"""``medsplit provision --helm``: values and Secret manifests for both Helm charts.

From the same provisioned folder as every other kit, into ``DIR/helm``::

    aggregator-values.yaml    job id and sites, the generated mosquitto.conf, ACL and CRL (for
                              the chart's ConfigMaps), revocations.json, the Secret names and
                              their checksums, the in-cluster broker URL
    aggregator-secrets.yaml   the aggregator's and the broker's certificates and keys (0600)
    SITE-values.yaml          one hospital's site, job, broker URL, Secret name and checksum
    SITE-secret.yaml          that hospital's certificate and key (0600)

Key material goes only into Secret manifests, never into values, so values files can be kept
in version control while Secrets are applied with ``kubectl apply`` (or converted into sealed
or external secrets). The checksums in the values roll a pod when its Secret changes (renewal);
a new ACL or CRL rolls the broker through the chart's own ConfigMap checksum. Every change to
the federation (--add-site, --renew, --revoke) rewrites this folder.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from medsplit.ids import AGGREGATOR_ID
from medsplit.security import bridge_files, mosquitto_files
from medsplit.security.pki import write_private
from medsplit.storage import atomic_write

if TYPE_CHECKING:
    from medsplit.security.federation import Federation, Study

CONFIG_DIR = Path("/mosquitto/config")  # where the chart mounts the broker's files
DATA_DIR = Path("/mosquitto/data")  # and its persistence volume
HEADER = "# Written by `medsplit provision --helm`; regenerate it, never edit it.\n"
SHARED_BROKER = "medsplit-broker"  # the broker release of a several-job federation


def fullname(study: Study) -> str:
    """A job's release resource prefix (its fullnameOverride), short enough for ``-mosquitto``
    and ``-headless`` to stay within a 63-character service name."""
    return f"medsplit-{study.job_id}"[:52].rstrip("-")


def broker_fullname(federation: Federation) -> str:
    """The release that runs the broker: the job's own, or the shared broker release."""
    studies = federation.studies()
    return fullname(studies[0]) if not studies[0].qualified else SHARED_BROKER


def in_cluster_hosts(federation: Federation) -> list[str]:
    """The names the aggregators use for the broker's Service; its certificate carries them."""
    if not federation.helm_namespace:
        return []
    return _service_names(f"{broker_fullname(federation)}-mosquitto", federation.helm_namespace)


def _service_names(service: str, namespace: str) -> list[str]:
    """Every name a pod may use for a Service (the third is what the charts' URLs use)."""
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local"]  # fmt: skip


def hospital_broker_name(site: str) -> str:
    """The Service (and resources) of ``site``'s hospital broker in its edge release."""
    return f"medsplit-{site}-broker"[:63].rstrip("-")


def hospital_broker_hosts(federation: Federation, site: str) -> list[str]:
    """The in-cluster names of ``site``'s hospital broker, for its certificate."""
    if not federation.helm_namespace:
        return []
    return _service_names(hospital_broker_name(site), federation.helm_namespace)


def broker_url_in_cluster(federation: Federation) -> str:
    return f"mqtts://{in_cluster_hosts(federation)[2]}:{federation.port}"


def secret_name(study: Study, party: str) -> str:
    return f"medsplit-{study.job_id}-{party}-tls"


def write(out: Path, federation: Federation) -> list[Path]:
    """Every file of ``DIR/helm`` for the federation as provisioned in ``out``: with one job,
    its release runs the broker too; with several, ``broker-*`` is a broker-only release and
    ``JOB/`` holds each job's files."""
    helm = out / "helm"
    helm.mkdir(exist_ok=True)
    studies = federation.studies()
    shared = studies[0].qualified
    broker_name = f"{SHARED_BROKER}-tls" if shared else secret_name(studies[0], "broker")
    broker = _secret(
        federation,
        broker_name,
        "broker",
        out / "mosquitto",
        ("ca.pem", "server.pem", "server.key"),
        job=None if shared else studies[0].job_id,
    )
    written = []
    if shared:
        written += [
            _write_secrets(helm / "broker-secrets.yaml", [broker]),
            _write_values(helm / "broker-values.yaml", broker_values(out, federation, broker)),
        ]
    for study in studies:
        folder = helm / study.job_id if shared else helm
        folder.mkdir(exist_ok=True)
        written += _write_job(out, folder, federation, study, None if shared else broker)
    return written


def _write_job(
    out: Path, folder: Path, federation: Federation, study: Study, broker: dict[str, Any] | None
) -> list[Path]:
    """A job's aggregator values and Secrets (with the broker's, when it runs the broker) and
    each of its sites'."""
    tls = ("ca.pem", "cert.pem", "key.pem")
    aggregator = _secret(
        federation,
        secret_name(study, AGGREGATOR_ID),
        AGGREGATOR_ID,
        study.kit(out, AGGREGATOR_ID),
        tls,
        job=study.job_id,
    )
    values = aggregator_values(out, federation, study, aggregator)
    if broker is not None:
        values["mosquitto"] = mosquitto_values(out, federation, broker)
    else:
        values["mosquitto"] = {"enabled": False, "port": federation.port}
        values["networkPolicy"] = {
            "brokerPodLabels": {
                "app.kubernetes.io/instance": SHARED_BROKER,
                "app.kubernetes.io/component": "mosquitto",
            }
        }
    secrets = [aggregator] if broker is None else [aggregator, broker]
    written = [
        _write_secrets(folder / "aggregator-secrets.yaml", secrets),
        _write_values(folder / "aggregator-values.yaml", values),
    ]
    for site in study.sites:
        secret = _secret(
            federation,
            secret_name(study, site),
            site,
            study.kit(out, site),
            (*tls, "seal.key"),
            job=study.job_id,
        )
        values = site_values(federation, study, site, secret)
        secrets = [secret]
        if site in federation.hospital_brokers:
            secrets += _hospital_broker(out, federation, study, site, values)
        written.append(_write_secrets(folder / f"{site}-secret.yaml", secrets))
        written.append(_write_values(folder / f"{site}-values.yaml", values))
    return written


def _hospital_broker(
    out: Path, federation: Federation, study: Study, site: str, values: dict[str, Any]
) -> list[dict[str, Any]]:
    """Point the site's values at its hospital broker; the release of the first job it is in
    also runs that broker (and its Secret is returned, to go beside the site's)."""
    spec = federation.hospital_brokers[site]
    name = hospital_broker_name(site)
    values["site"]["brokerUrl"] = (
        f"mqtts://{hospital_broker_hosts(federation, site)[2]}:{spec.port}"
    )
    first = next(s for s in federation.studies() if site in s.sites)
    if first != study:
        values["networkPolicy"] = {
            "brokerPort": spec.port,
            "brokerPodLabels": {"medsplit.io/hospital-broker": name},
        }
        return []
    files = ("ca.pem", "server.pem", "server.key", "bridge.pem", "bridge.key")
    secret = _secret(federation, f"{name}-tls", "hospital-broker", out / "bridges" / site, files)
    in_pod = spec.model_copy(
        update={"broker_dir": CONFIG_DIR, "broker_data_dir": DATA_DIR, "broker_user": None,
                "bind_address": None}
    )  # fmt: skip
    values["hospitalBroker"] = {
        "enabled": True,
        "name": name,
        "existingSecret": secret["metadata"]["name"],
        "config": bridge_files.hospital_config(federation, site, in_pod, CONFIG_DIR),
        "acl": bridge_files.hospital_acl(federation, site),
        "crl": (out / "bridges" / site / "crl.pem").read_text(),
        "port": spec.port,
        "centralPort": int(bridge_files.remote_address(federation, spec).rsplit(":", 1)[1]),
        "podAnnotations": {"checksum/tls": _checksum(secret)},
    }
    return [secret]


def aggregator_values(
    out: Path, federation: Federation, study: Study, aggregator: dict[str, Any]
) -> dict[str, Any]:
    kit = study.kit(out, AGGREGATOR_ID)
    return {
        "fullnameOverride": fullname(study),
        "job": {
            "jobId": study.job_id,
            "sites": list(study.sites),
            "revocations": (kit / "revocations.json").read_text(),
            "roster": (kit / "roster.json").read_text(),
        },
        "aggregator": {
            "existingSecret": aggregator["metadata"]["name"],
            "brokerUrl": broker_url_in_cluster(federation),
            "podAnnotations": {"checksum/tls": _checksum(aggregator)},
        },
    }


def broker_values(out: Path, federation: Federation, broker: dict[str, Any]) -> dict[str, Any]:
    """The shared broker's release: the aggregator chart with no aggregator."""
    return {
        "fullnameOverride": SHARED_BROKER,
        "aggregator": {"enabled": False},
        "persistence": {"enabled": False},
        "mosquitto": mosquitto_values(out, federation, broker),
    }


def mosquitto_values(out: Path, federation: Federation, broker: dict[str, Any]) -> dict[str, Any]:
    config = mosquitto_files.config(
        federation.model_copy(update={"bind_address": None, "broker_user": None}),
        CONFIG_DIR,
        DATA_DIR,
    )
    return {
        "existingSecret": broker["metadata"]["name"],
        "config": config,
        "acl": mosquitto_files.acl(federation),
        "crl": (out / "mosquitto" / "crl.pem").read_text(),
        "port": federation.port,
        "service": {"port": federation.port},
        "podAnnotations": {"checksum/tls": _checksum(broker)},
    }


def site_values(
    federation: Federation, study: Study, site: str, secret: dict[str, Any]
) -> dict[str, Any]:
    return {
        "site": {
            "siteId": site,
            "jobId": study.job_id,
            "brokerUrl": federation.broker_url,
            "existingSecret": secret["metadata"]["name"],
        },
        "podAnnotations": {"checksum/tls": _checksum(secret)},
        "networkPolicy": {"brokerPort": federation.port},
    }


def describe(out: Path, federation: Federation) -> list[str]:
    helm = out / "helm"
    ns = federation.helm_namespace
    studies = federation.studies()
    if not studies[0].qualified:
        return [
            f"{helm}: Helm values and Secrets for namespace {ns}",
            f"  kubectl apply -n {ns} -f {helm / 'aggregator-secrets.yaml'}",
            f"  helm install {fullname(studies[0])} helm/medsplit-aggregator -n {ns} "
            f"-f {helm / 'aggregator-values.yaml'}",
            f"  per hospital: kubectl apply -f {helm / 'SITE-secret.yaml'}; helm install SITE "
            f"helm/medsplit-edge -f {helm / 'SITE-values.yaml'} --set data.hostPath=...",
        ]
    return [
        f"{helm}: Helm values and Secrets for namespace {ns}: one broker release, one per job",
        f"  kubectl apply -n {ns} -f {helm / 'broker-secrets.yaml'}; helm install "
        f"{SHARED_BROKER} helm/medsplit-aggregator -n {ns} -f {helm / 'broker-values.yaml'}",
        f"  per job: kubectl apply -n {ns} -f {helm / 'JOB' / 'aggregator-secrets.yaml'}; "
        f"helm install medsplit-JOB helm/medsplit-aggregator -n {ns} "
        f"-f {helm / 'JOB' / 'aggregator-values.yaml'}",
        f"  per hospital and job: {helm / 'JOB' / 'SITE-secret.yaml'} and SITE-values.yaml "
        "for helm/medsplit-edge",
    ]


def _secret(
    federation: Federation,
    name: str,
    party: str,
    folder: Path,
    files: tuple[str, ...],
    *,
    job: str | None = None,
) -> dict[str, Any]:
    labels = {"app.kubernetes.io/part-of": "medsplit", "medsplit.io/identity": party}
    if job is not None:
        labels["medsplit.io/job"] = job
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "namespace": federation.helm_namespace, "labels": labels},
        "data": {f: base64.b64encode((folder / f).read_bytes()).decode() for f in files},
    }


def _checksum(secret: dict[str, Any]) -> str:
    data = secret["data"]
    return hashlib.sha256("".join(f"{k}={data[k]};" for k in sorted(data)).encode()).hexdigest()


def _write_secrets(path: Path, secrets: list[dict[str, Any]]) -> Path:
    write_private(path, (HEADER + yaml.safe_dump_all(secrets, sort_keys=False)).encode())
    return path


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (mosquitto.conf, the ACL, the CRL) as readable ``|`` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _write_values(path: Path, values: dict[str, Any]) -> Path:
    text = yaml.dump(values, Dumper=_Dumper, sort_keys=False, width=100)
    atomic_write(path, (HEADER + text).encode())
    return path
