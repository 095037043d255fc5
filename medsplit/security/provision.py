"""``medsplit provision``: every participant's kit from one federation description.

As NVIDIA FLARE's provisioner builds startup kits from one project file, this builds, from one
``federation.yaml`` (or the same fields as flags)::

    DIR/federation.yaml           the description itself: what add/renew/revoke start from
    DIR/ca/                       ca.key (0600; keep it offline), ca.pem, inventory.json, crl.pem
    DIR/mosquitto/                mosquitto.conf, ca.pem, server.pem, server.key, acl, crl.pem
    DIR/aggregator/               ca.pem, cert.pem, key.pem, job.yaml, revocations.json,
                                  roster.json (every site's public sealing keys, CA-signed)
    DIR/<site>/                   ca.pem, cert.pem, key.pem, seal.key (0600), site.yaml

A federation with several ``jobs`` (``medsplit.security.federation``) shares the CA and the
broker, and has ``DIR/<job>/aggregator`` and ``DIR/<job>/<site>`` instead: one kit, one
identity (``party@job``) and one agent per hospital and job.

Unlike FLARE it also adds a site without reissuing the others, renews one certificate, and
revokes one: the CRL and the ACL are rewritten (the broker picks both up on SIGHUP), and the
aggregator's ``revocations.json`` names the revoked identity, which a running aggregator
refuses at once, before the broker reloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from medsplit.ids import AGGREGATOR_ID
from medsplit.security import bridge_files, helm_files, mosquitto_files
from medsplit.security.broker_user import broker_user
from medsplit.security.federation import (
    BROKER_ID,
    KIT_FOLDERS,
    MIN_PACKET_BYTES,
    Federation,
    Study,
    load_federation,
    split_identity,
)
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
from models.config_errors import validate

__all__ = [
    "BROKER_ID",
    "KIT_FOLDERS",
    "MIN_PACKET_BYTES",
    "Federation",
    "Provisioner",
    "load_federation",
]


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
        name = f"medsplit {federation.name} CA"[:64]
        CertificateAuthority.create(out / "ca", name, federation.ca_validity_days)
        _save_federation(out, federation)
        kit = cls(out)
        kit._issue_broker()
        for study in federation.studies():
            kit._issue(study, AGGREGATOR_ID, "aggregator")
            for site in study.sites:
                kit._issue(study, site, "site")
        for site in federation.hospital_brokers:
            kit._issue_hospital_broker(site)
        kit._publish()
        return kit

    # -- changes ----------------------------------------------------------------------------------

    def add_site(self, identity: str) -> list[str]:
        """A new site's kit; the others keep theirs. The ACL grows by the site's block. In a
        several-job federation ``identity`` is SITE@JOB; a new JOB gets its aggregator's kit."""
        site, job = self._job_of(identity)
        new_job = job is not None and job not in {s.job_id for s in self.federation.studies()}
        sites = [site] if new_job else [*self._study(job).sites, site]
        self.federation = _with_sites(self.federation, job, sites)
        _save_federation(self.out, self.federation)
        study = self._study(job)
        if new_job:
            self._issue(study, AGGREGATOR_ID, "aggregator")
        self._issue(study, site, "site")
        self._publish()
        lines = [f"{study.kit(self.out, site)}: the kit of {study.identity(site)}"]
        if new_job:
            lines.append(f"{study.kit(self.out, AGGREGATOR_ID)}: the kit of job {job}'s aggregator")
        return [
            *lines,
            f"add {site} to job {study.job_id}'s sites (job.yaml), then reload the broker (SIGHUP)",
        ]

    def renew(self, identity: str) -> list[str]:
        """A new key and certificate; the one it replaces is revoked as superseded."""
        hospital = identity.partition(":")[2]
        if identity == BROKER_ID:
            issued, target = self._issue_broker(), self.out / "mosquitto"
        elif hospital in self.federation.hospital_brokers and identity in (
            bridge_files.bridge_identity(hospital),
            bridge_files.hospital_broker_identity(hospital),
        ):
            issued = self._issue_hospital_broker(hospital, only=identity)
            target = self.out / "bridges" / hospital
        else:
            party, job = self._job_of(identity)
            study = self._study(job)
            if party != AGGREGATOR_ID and party not in study.sites:
                raise PkiError(f"{identity!r} is neither broker, aggregator nor a site of this "
                               f"federation ({self._identities()})")  # fmt: skip
            role: Role = "aggregator" if party == AGGREGATOR_ID else "site"
            issued, target = self._issue(study, party, role), study.kit(self.out, party)
        superseded = self.ca.revoke(issued.identity, "superseded", keep=issued.serial)
        self._publish()
        return [
            f"{target}: new certificate for {issued.identity}, valid until {issued.not_after}",
            f"{superseded} older certificate(s) of {issued.identity} revoked as superseded",
            "copy the kit to its host and restart that process; reload the broker (SIGHUP)",
        ]

    def revoke(self, identity: str) -> list[str]:
        """Revoke every certificate of ``identity``; it leaves the ACL and the job. In a
        several-job federation a bare site id leaves every job it is in."""
        site, job = split_identity(identity)
        if self.federation.jobs is None and job is not None:
            raise PkiError(f"{identity!r}: this federation has one job; use the bare id")
        studies = self.federation.studies()
        chosen = [s for s in studies if (job is None or s.job_id == job) and site in s.sites]
        if not chosen:
            raise PkiError(
                f"{identity!r} is not a site of this federation ({self._identities()}); "
                "renew the broker or aggregator instead"
            )
        lines = []
        for study in chosen:
            count = self.ca.revoke(study.identity(site))
            remaining = [s for s in study.sites if s != site]
            job_key = study.job_id if study.qualified else None
            self.federation = _with_sites(self.federation, job_key, remaining)
            lines.append(f"{count} certificate(s) of {study.identity(site)} revoked")
        _save_federation(self.out, self.federation)
        self._publish()
        kits = ", ".join(str(s.kit(self.out, AGGREGATOR_ID) / "revocations.json") for s in chosen)
        return [
            *lines,
            "CRL and ACL rewritten",
            f"the aggregator refuses {site} within seconds ({kits}); "
            "copy it and mosquitto/{crl.pem,acl} where they are read",
            "reload the broker: kill -HUP $(pidof mosquitto) (kubectl: update the Secret; "
            "docker: docker kill -s HUP <broker>)",
        ]

    # -- who is who -------------------------------------------------------------------------------

    def _job_of(self, identity: str) -> tuple[str, str | None]:
        """(party, job) of an identity as this federation's form spells it."""
        party, job = split_identity(identity)
        qualified = self.federation.jobs is not None
        if qualified and job is None:
            raise PkiError(
                f"{identity!r}: this federation has several jobs; name the party as PARTY@JOB "
                f"({self._identities()})"
            )
        if not qualified and job is not None:
            raise PkiError(f"{identity!r}: this federation has one job; use the bare id")
        return party, job

    def _study(self, job: str | None) -> Study:
        if job is None:
            return self.federation.studies()[0]
        try:
            return self.federation.study(job)
        except KeyError:
            jobs = ", ".join(s.job_id for s in self.federation.studies())
            raise PkiError(f"job {job!r} is not in this federation (jobs: {jobs})") from None

    def _identities(self) -> str:
        ids = [s.identity(p) for s in self.federation.studies() for p in s.sites]
        return "sites: " + ", ".join(ids)

    def _revoked_sites(self, study: Study) -> set[str]:
        """Sites of ``study`` whose every certificate is revoked (they left the job)."""
        valid = {i.identity for i in self.ca.inventory if i.revoked_at is None}
        revoked = {i.identity for i in self.ca.revoked if i.role == "site"} - valid
        job = study.job_id if study.qualified else None
        return {party for party, of in map(split_identity, revoked) if of == job}

    # -- what is written --------------------------------------------------------------------------

    def _issue_broker(self) -> Issued:
        fed = self.federation
        hosts = (*fed.broker_hosts, *helm_files.in_cluster_hosts(fed))
        key, cert = self.ca.issue(BROKER_ID, "broker", fed.validity_days, hosts=hosts)
        folder = self.out / "mosquitto"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "ca.pem", self.ca.cert_path.read_bytes())
        write_private(folder / "server.key", key)
        atomic_write(folder / "server.pem", cert)
        return self.ca.inventory[-1]

    def _issue_hospital_broker(self, site: str, only: str | None = None) -> Issued:
        """The hospital broker's server certificate and its bridge's client certificate (or
        ``only`` one of them), in DIR/bridges/SITE."""
        spec = self.federation.hospital_brokers[site]
        folder = self.out / "bridges" / site
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "ca.pem", self.ca.cert_path.read_bytes())
        issued = []
        parts: list[tuple[str, Role, str, tuple[str, ...]]] = [
            (
                bridge_files.hospital_broker_identity(site),
                "broker",
                "server",
                (*spec.hosts, *helm_files.hospital_broker_hosts(self.federation, site)),
            ),
            (bridge_files.bridge_identity(site), "bridge", "bridge", ()),
        ]
        for identity, role, name, hosts in parts:
            if only not in (None, identity):
                continue
            key, cert = self.ca.issue(identity, role, self.federation.validity_days, hosts=hosts)
            write_private(folder / f"{name}.key", key)
            atomic_write(folder / f"{name}.pem", cert)
            issued.append(self.ca.inventory[-1])
        return issued[-1]

    def _issue(self, study: Study, party: str, role: Role) -> Issued:
        identity = study.identity(party)
        key, cert = self.ca.issue(identity, role, self.federation.validity_days)
        folder = study.kit(self.out, party)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "ca.pem", self.ca.cert_path.read_bytes())
        write_private(folder / "key.pem", key)
        atomic_write(folder / "cert.pem", cert)
        if role == "site":
            site_keys(folder, party)  # kept when the TLS certificate is renewed
            _write_yaml(folder / "site.yaml", site_fragment(self.federation, study, party))
        return self.ca.inventory[-1]

    def _publish(self) -> None:
        """CRL, ACL and broker config for the broker; job.yaml, revocations.json and the roster
        for each job's aggregator."""
        fed = self.federation
        broker = self.out / "mosquitto"
        atomic_write(broker / "crl.pem", self.ca.crl_path.read_bytes())
        atomic_write(broker / "acl", mosquitto_files.acl(fed).encode())
        (broker / "data").mkdir(exist_ok=True)
        runs_as = broker_user(fed.broker_user, broker, in_place=fed.broker_dir is None)
        self.notes = [runs_as.note] if runs_as.note else []
        config = mosquitto_files.config(
            fed, fed.broker_dir or broker, fed.broker_data_dir, runs_as.name
        )
        atomic_write(broker / "mosquitto.conf", config.encode())
        for study in fed.studies():
            self._publish_job(study)
        for site in fed.hospital_brokers:
            self._publish_hospital_broker(site)
        if fed.helm_namespace:
            helm_files.write(self.out, fed)

    def _publish_hospital_broker(self, site: str) -> None:
        spec = self.federation.hospital_brokers[site]
        folder = self.out / "bridges" / site
        atomic_write(folder / "crl.pem", self.ca.crl_path.read_bytes())
        atomic_write(folder / "acl", bridge_files.hospital_acl(self.federation, site).encode())
        (folder / "data").mkdir(exist_ok=True)
        runs_as = broker_user(spec.broker_user, folder, in_place=spec.broker_dir is None)
        self.notes += [runs_as.note] if runs_as.note else []
        running = spec.model_copy(update={"broker_user": runs_as.name})
        config = bridge_files.hospital_config(
            self.federation, site, running, spec.broker_dir or folder
        )
        atomic_write(folder / "mosquitto.conf", config.encode())

    def _publish_job(self, study: Study) -> None:
        kit = study.kit(self.out, AGGREGATOR_ID)
        _write_yaml(kit / "job.yaml", job_fragment(self.federation, study))
        revocations = {
            "updated": now().isoformat(),
            "identities": sorted(self._revoked_sites(study)),
            "serials": [f"{i.serial:x}" for i in self.ca.revoked],
        }
        atomic_write(kit / "revocations.json", (json.dumps(revocations, indent=1) + "\n").encode())
        # Only current sites are on the roster: a revoked one is left out of new seals.
        peers = {site: site_keys(study.kit(self.out, site), site).public() for site in study.sites}
        roster = roster_text(study.job_id, peers, self.ca.key)
        atomic_write(kit / ROSTER_FILE, roster.encode())

    def enable_helm(self, namespace: str) -> list[str]:
        """Write DIR/helm for ``namespace`` from now on; the broker's certificate is renewed
        when it does not yet name the in-cluster service there."""
        renew = self.federation.helm_namespace != namespace
        self.federation = _checked(self.federation, helm_namespace=namespace)
        _save_federation(self.out, self.federation)
        lines = self.renew(BROKER_ID) if renew else []
        for site in self.federation.hospital_brokers if renew else ():
            lines += self.renew(bridge_files.hospital_broker_identity(site))
        self._publish()
        return [*lines, *helm_files.describe(self.out, self.federation)]


def site_fragment(fed: Federation, study: Study, site: str) -> dict[str, Any]:
    return {
        "site_id": site,
        "job_id": study.job_id,
        "broker": {"url": fed.site_broker_url(site), "tls": _tls_files()},
        "sealing": {"key_file": SEAL_KEY_FILE, "ca_file": "ca.pem"},
    }


def job_fragment(fed: Federation, study: Study) -> dict[str, Any]:
    return {
        "job_id": study.job_id,
        "sites": list(study.sites),
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


def _with_sites(federation: Federation, job: str | None, sites: list[str]) -> Federation:
    """``federation`` with ``job``'s sites (``None``: the one job's) set to ``sites``; a job
    left without sites leaves the federation."""
    if job is None:
        brokers = {s: b for s, b in federation.hospital_brokers.items() if s in sites}
        return _checked(federation, sites=sites, hospital_brokers=brokers)
    jobs = {j: list(s.sites) for j, s in (federation.jobs or {}).items()}
    jobs[job] = sites
    if not sites:
        del jobs[job]
    members = {site for s in jobs.values() for site in s}
    brokers = {s: b for s, b in federation.hospital_brokers.items() if s in members}
    return _checked(
        federation, jobs={j: {"sites": s} for j, s in jobs.items()}, hospital_brokers=brokers
    )


def _checked(federation: Federation, **changes: Any) -> Federation:
    checked: Federation = validate(
        Federation, {**federation.model_dump(), **changes}, "federation.yaml"
    )
    return checked
