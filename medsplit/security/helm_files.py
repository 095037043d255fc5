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
from medsplit.security import mosquitto_files
from medsplit.security.pki import write_private
from medsplit.storage import atomic_write

if TYPE_CHECKING:
    from medsplit.security.provision import Federation

CONFIG_DIR = Path("/mosquitto/config")  # where the chart mounts the broker's files
DATA_DIR = Path("/mosquitto/data")  # and its persistence volume
HEADER = "# Written by `medsplit provision --helm`; regenerate it, never edit it.\n"


def fullname(federation: Federation) -> str:
    """The aggregator release's resource prefix (its fullnameOverride): one per federation, short
    enough for ``-mosquitto`` and ``-headless`` to stay within a 63-character service name."""
    return f"medsplit-{federation.job_id}"[:52].rstrip("-")


def in_cluster_hosts(federation: Federation) -> list[str]:
    """The names the aggregator uses for the broker's Service; its certificate carries them."""
    if not federation.helm_namespace:
        return []
    service, namespace = f"{fullname(federation)}-mosquitto", federation.helm_namespace
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local"]  # fmt: skip


def broker_url_in_cluster(federation: Federation) -> str:
    return f"mqtts://{in_cluster_hosts(federation)[2]}:{federation.port}"


def secret_name(federation: Federation, identity: str) -> str:
    return f"medsplit-{federation.job_id}-{identity}-tls"


def write(out: Path, federation: Federation) -> list[Path]:
    """Every file of ``DIR/helm`` for the federation as provisioned in ``out``."""
    helm = out / "helm"
    helm.mkdir(exist_ok=True)
    aggregator = _secret(
        federation, AGGREGATOR_ID, out / AGGREGATOR_ID, ("ca.pem", "cert.pem", "key.pem")
    )
    broker = _secret(
        federation, "broker", out / "mosquitto", ("ca.pem", "server.pem", "server.key")
    )
    written = [
        _write_secrets(helm / "aggregator-secrets.yaml", [aggregator, broker]),
        _write_values(helm / "aggregator-values.yaml", aggregator_values(out, federation, aggregator, broker)),
    ]  # fmt: skip
    for site in federation.sites:
        files = ("ca.pem", "cert.pem", "key.pem", "seal.key")
        secret = _secret(federation, site, out / site, files)
        written.append(_write_secrets(helm / f"{site}-secret.yaml", [secret]))
        written.append(
            _write_values(helm / f"{site}-values.yaml", site_values(federation, site, secret))
        )
    return written


def aggregator_values(
    out: Path, federation: Federation, aggregator: dict[str, Any], broker: dict[str, Any]
) -> dict[str, Any]:
    config = mosquitto_files.config(
        federation.model_copy(update={"bind_address": None, "broker_user": None}),
        CONFIG_DIR,
        DATA_DIR,
    )
    return {
        "fullnameOverride": fullname(federation),
        "job": {
            "jobId": federation.job_id,
            "sites": list(federation.sites),
            "revocations": (out / AGGREGATOR_ID / "revocations.json").read_text(),
            "roster": (out / AGGREGATOR_ID / "roster.json").read_text(),
        },
        "aggregator": {
            "existingSecret": aggregator["metadata"]["name"],
            "brokerUrl": broker_url_in_cluster(federation),
            "podAnnotations": {"checksum/tls": _checksum(aggregator)},
        },
        "mosquitto": {
            "existingSecret": broker["metadata"]["name"],
            "config": config,
            "acl": mosquitto_files.acl(federation),
            "crl": (out / "mosquitto" / "crl.pem").read_text(),
            "port": federation.port,
            "service": {"port": federation.port},
            "podAnnotations": {"checksum/tls": _checksum(broker)},
        },
    }


def site_values(federation: Federation, site: str, secret: dict[str, Any]) -> dict[str, Any]:
    return {
        "site": {
            "siteId": site,
            "jobId": federation.job_id,
            "brokerUrl": federation.broker_url,
            "existingSecret": secret["metadata"]["name"],
        },
        "podAnnotations": {"checksum/tls": _checksum(secret)},
        "networkPolicy": {"brokerPort": federation.port},
    }


def describe(out: Path, federation: Federation) -> list[str]:
    helm = out / "helm"
    ns = federation.helm_namespace
    return [
        f"{helm}: Helm values and Secrets for namespace {ns}",
        f"  kubectl apply -n {ns} -f {helm / 'aggregator-secrets.yaml'}",
        f"  helm install {fullname(federation)} helm/medsplit-aggregator -n {ns} "
        f"-f {helm / 'aggregator-values.yaml'}",
        f"  per hospital: kubectl apply -f {helm / 'SITE-secret.yaml'}; helm install SITE "
        f"helm/medsplit-edge -f {helm / 'SITE-values.yaml'} --set data.hostPath=...",
    ]


def _secret(
    federation: Federation, identity: str, folder: Path, names: tuple[str, ...]
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(federation, identity),
            "namespace": federation.helm_namespace,
            "labels": {
                "app.kubernetes.io/part-of": "medsplit",
                "medsplit.io/job": federation.job_id,
                "medsplit.io/identity": identity,
            },
        },
        "data": {name: base64.b64encode((folder / name).read_bytes()).decode() for name in names},
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
