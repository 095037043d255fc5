"""``medsplit provision``: every participant's kit from one federation description.

As NVIDIA FLARE's provisioner builds startup kits from one project file, this builds, from one
``federation.yaml`` (or the same fields as flags)::

    DIR/federation.yaml           the description itself: what add/renew/revoke start from
    DIR/ca/                       ca.key (0600; keep it offline), ca.pem, inventory.json, crl.pem
    DIR/mosquitto/                mosquitto.conf, ca.pem, server.pem, server.key, acl, crl.pem
    DIR/aggregator/               ca.pem, cert.pem, key.pem, job.yaml, revocations.json,
                                  roster.json (every site's public sealing keys, CA-signed)
    DIR/<site>/                   ca.pem, cert.pem, key.pem, seal.key (0600), site.yaml

Unlike FLARE it also adds a site without reissuing the others, renews one certificate, and
revokes one: the CRL and the ACL are rewritten (the broker picks both up on SIGHUP), and the
aggregator's ``revocations.json`` names the revoked identity, which a running aggregator
refuses at once, before the broker reloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from medsplit.ids import AGGREGATOR_ID, ID_PATTERN, RESERVED_IDS, check_site_ids
from medsplit.security import helm_files, mosquitto_files
from medsplit.security.broker_user import broker_user
from medsplit.security.pki import (
    CertificateAuthority,
    Issued,
    PkiError,
    Role,
    now,
    write_private,
)
from medsplit.security.seal_kit import ROSTER_FILE, SEAL_KEY_FILE, roster_text, site_keys
from medsplit.storage import atomic_write
from models.config_errors import load_yaml_mapping, validate

BROKER_ID = "broker"
KIT_FOLDERS = frozenset({"ca", "mosquitto"})  # DIR/<name> that are not an identity's kit
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


# A frame's payload (256 KiB) and largest header (64 KiB), with room for the topic.
MIN_PACKET_BYTES = 256 * 1024 + 64 * 1024 + 1024


class Federation(BaseModel):
    """One federation: its job, its sites, where its broker is, how long certificates live."""

    model_config = ConfigDict(extra="forbid")

    job_id: Id = Field(description="the job the kits are for; part of every topic the ACL grants")
    sites: list[Id] = Field(min_length=1, description="site ids: each one's certificate CN")
    broker_hosts: list[str] = Field(
        min_length=1,
        description="names (or IPs) clients use for the broker; all go into its certificate, "
        "the first into the kits' broker URL",
    )
    port: int = Field(8883, ge=1, le=65535, description="the broker's TLS port")
    bind_address: str | None = Field(None, description="listen on this address only")
    validity_days: float = Field(
        30, gt=0, le=397, description="lifetime of the broker, aggregator and site certificates"
    )
    ca_validity_days: float = Field(1095, gt=1, description="lifetime of the CA")
    broker_dir: Path | None = Field(
        None,
        description="where the broker will find DIR/mosquitto's files (e.g. /mosquitto/config "
        "in a container); default: that folder itself",
    )
    broker_data_dir: Path | None = Field(
        None, description="where the broker keeps its persistence; default: BROKER_DIR/data"
    )
    broker_user: str | None = Field(
        None, description="the OS user Mosquitto runs as (its 'user' option)"
    )
    max_packet_bytes: int = Field(
        1024 * 1024,
        ge=MIN_PACKET_BYTES,
        description="the broker refuses (and disconnects) any larger MQTT packet: medsplit's "
        "frames are at most 256 KiB of payload and 64 KiB of header, so this bounds what one "
        "client can make the broker hold per message",
    )
    helm_namespace: str | None = Field(
        None,
        pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        description="also write DIR/helm (values and Secrets for both charts) for this "
        "Kubernetes namespace; the broker's certificate then names its in-cluster service too",
    )

    @field_validator("sites")
    @classmethod
    def _sites(cls, sites: list[str]) -> list[str]:
        return check_site_ids(sites, RESERVED_IDS | KIT_FOLDERS | {BROKER_ID})

    @property
    def broker_url(self) -> str:
        return f"mqtts://{self.broker_hosts[0]}:{self.port}"


def load_federation(path: Path) -> Federation:
    federation: Federation = validate(Federation, load_yaml_mapping(path), str(path))
    return federation


class Provisioner:
    """The provisioned folder ``out``: made by ``create``, changed by the other methods."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.notes: list[str] = []  # what the last change has to say about the broker's files
        self.federation = load_federation(out / "federation.yaml")
        self.ca = CertificateAuthority(out / "ca")

    @classmethod
    def create(cls, federation: Federation, out: Path) -> Provisioner:
        if (out / "federation.yaml").exists() or (out / "ca").exists():
            raise PkiError(
                f"{out} is already provisioned; use --add-site, --renew or --revoke to change it"
            )
        out.mkdir(parents=True, exist_ok=True)
        CertificateAuthority.create(
            out / "ca", f"medsplit {federation.job_id} CA", federation.ca_validity_days
        )
        _save_federation(out, federation)
        kit = cls(out)
        kit._issue(BROKER_ID, "broker")
        kit._issue(AGGREGATOR_ID, "aggregator")
        for site in federation.sites:
            kit._issue(site, "site")
        kit._publish()
        return kit

    # -- changes ----------------------------------------------------------------------------------

    def add_site(self, site: str) -> list[str]:
        """A new site's kit; the others keep theirs. The ACL grows by the site's block."""
        sites = [*self.federation.sites, site]
        self.federation = _checked(self.federation, sites=sites)
        _save_federation(self.out, self.federation)
        self._issue(site, "site")
        self._publish()
        return [
            f"{self.out / site}: the kit of {site}",
            f"add {site} to the job's sites (job.yaml), then reload the broker (SIGHUP)",
        ]

    def renew(self, identity: str) -> list[str]:
        """A new key and certificate; the one it replaces is revoked as superseded."""
        role = self._role(identity)
        issued = self._issue(identity, role)
        superseded = self.ca.revoke(identity, "superseded", keep=issued.serial)
        self._publish()
        target = self.out / ("mosquitto" if role == "broker" else identity)
        return [
            f"{target}: new certificate for {identity}, valid until {issued.not_after}",
            f"{superseded} older certificate(s) of {identity} revoked as superseded",
            "copy the kit to its host and restart that process; reload the broker (SIGHUP)",
        ]

    def revoke(self, identity: str) -> list[str]:
        """Revoke every certificate of ``identity``; it leaves the ACL and the job."""
        if identity not in self.federation.sites:
            raise PkiError(
                f"{identity!r} is not a site of this federation (sites: "
                f"{', '.join(self.federation.sites)}); renew the broker or aggregator instead"
            )
        count = self.ca.revoke(identity)
        self.federation = _checked(
            self.federation, sites=[s for s in self.federation.sites if s != identity]
        )
        _save_federation(self.out, self.federation)
        self._revoked_sites.add(identity)
        self._publish()
        return [
            f"{count} certificate(s) of {identity} revoked; CRL and ACL rewritten",
            f"the aggregator refuses {identity} within seconds (aggregator/revocations.json); "
            "copy it and mosquitto/{crl.pem,acl} where they are read",
            "reload the broker: kill -HUP $(pidof mosquitto) (kubectl: update the Secret; "
            "docker: docker kill -s HUP <broker>)",
        ]

    # -- what is written --------------------------------------------------------------------------

    @property
    def _revoked_sites(self) -> set[str]:
        valid = {i.identity for i in self.ca.inventory if i.revoked_at is None}
        revoked = {i.identity for i in self.ca.revoked if i.role == "site"}
        return revoked - valid

    def _role(self, identity: str) -> Role:
        if identity == BROKER_ID:
            return "broker"
        if identity == AGGREGATOR_ID:
            return "aggregator"
        if identity in self.federation.sites:
            return "site"
        raise PkiError(f"{identity!r} is neither broker, aggregator nor a site of this federation")

    def _issue(self, identity: str, role: Role) -> Issued:
        fed = self.federation
        hosts = (*fed.broker_hosts, *helm_files.in_cluster_hosts(fed)) if role == "broker" else ()
        key, cert = self.ca.issue(identity, role, fed.validity_days, hosts=hosts)
        folder = self.out / ("mosquitto" if role == "broker" else identity)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "ca.pem", self.ca.cert_path.read_bytes())
        name = "server" if role == "broker" else "cert"
        write_private(folder / f"{name}.key" if role == "broker" else folder / "key.pem", key)
        atomic_write(folder / f"{name}.pem", cert)
        if role == "site":
            site_keys(folder, identity)  # kept when the TLS certificate is renewed
            _write_yaml(folder / "site.yaml", site_fragment(fed, identity))
        return self.ca.inventory[-1]

    def _publish(self) -> None:
        """CRL, ACL and broker config for the broker; job.yaml and revocations.json for the
        aggregator."""
        _write_yaml(self.out / AGGREGATOR_ID / "job.yaml", job_fragment(self.federation))
        broker = self.out / "mosquitto"
        atomic_write(broker / "crl.pem", self.ca.crl_path.read_bytes())
        atomic_write(broker / "acl", mosquitto_files.acl(self.federation).encode())
        fed = self.federation
        (broker / "data").mkdir(exist_ok=True)
        runs_as = broker_user(fed.broker_user, broker, in_place=fed.broker_dir is None)
        self.notes = [runs_as.note] if runs_as.note else []
        config = mosquitto_files.config(
            fed, fed.broker_dir or broker, fed.broker_data_dir, runs_as.name
        )
        atomic_write(broker / "mosquitto.conf", config.encode())
        revocations = {
            "updated": now().isoformat(),
            "identities": sorted(self._revoked_sites),
            "serials": [f"{i.serial:x}" for i in self.ca.revoked],
        }
        atomic_write(
            self.out / AGGREGATOR_ID / "revocations.json",
            (json.dumps(revocations, indent=1) + "\n").encode(),
        )
        # Only current sites are on the roster: a revoked one is left out of new seals.
        peers = {site: site_keys(self.out / site, site).public() for site in fed.sites}
        roster = roster_text(fed.job_id, peers, self.ca.key)
        atomic_write(self.out / AGGREGATOR_ID / ROSTER_FILE, roster.encode())
        if fed.helm_namespace:
            helm_files.write(self.out, fed)

    def enable_helm(self, namespace: str) -> list[str]:
        """Write DIR/helm for ``namespace`` from now on; the broker's certificate is renewed
        when it does not yet name the in-cluster service there."""
        renew = self.federation.helm_namespace != namespace
        self.federation = _checked(self.federation, helm_namespace=namespace)
        _save_federation(self.out, self.federation)
        lines = self.renew(BROKER_ID) if renew else []
        self._publish()
        return [*lines, *helm_files.describe(self.out, self.federation)]


def site_fragment(fed: Federation, site: str) -> dict[str, Any]:
    return {
        "site_id": site,
        "job_id": fed.job_id,
        "broker": {"url": fed.broker_url, "tls": _tls_files()},
        "sealing": {"key_file": SEAL_KEY_FILE, "ca_file": "ca.pem"},
    }


def job_fragment(fed: Federation) -> dict[str, Any]:
    return {
        "job_id": fed.job_id,
        "sites": list(fed.sites),
        "broker": {"url": fed.broker_url, "tls": _tls_files()},
        "security": {"revocations_file": "revocations.json", "roster_file": ROSTER_FILE},
    }


def _tls_files() -> dict[str, str]:
    # Relative to the YAML file they are in: the kit folder can move as a whole.
    return {"ca_file": "ca.pem", "cert_file": "cert.pem", "key_file": "key.pem"}


PARTICIPANT_HEADER = (
    "# Written by `medsplit provision`: the broker and certificates of this participant.\n"
    "# Files are relative to this one; add the rest of the configuration below.\n"
)
FEDERATION_HEADER = (
    "# The federation `medsplit provision` made this folder from; --add-site and --revoke\n"
    "# keep it current. Edit it only through those flags.\n"
)


def _write_yaml(path: Path, data: dict[str, Any], header: str = PARTICIPANT_HEADER) -> None:
    atomic_write(path, (header + yaml.safe_dump(data, sort_keys=False)).encode())


def _save_federation(out: Path, federation: Federation) -> None:
    data = federation.model_dump(mode="json", exclude_none=True)
    _write_yaml(out / "federation.yaml", data, FEDERATION_HEADER)


def _checked(federation: Federation, **changes: Any) -> Federation:
    checked: Federation = validate(
        Federation, {**federation.model_dump(), **changes}, "federation.yaml"
    )
    return checked
