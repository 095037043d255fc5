"""What ``medsplit provision`` provisions: one ``federation.yaml``, one broker, one or more jobs.

A federation is one CA and one broker. It runs either one job (``job_id`` and ``sites``, the
original form: kits in ``DIR/aggregator`` and ``DIR/<site>``, certificate CNs ``aggregator`` and
the site ids) or several (``jobs``: a consortium's studies sharing the broker)::

    jobs:
      tumour-grade: {sites: [st-marys, kings]}
      sepsis:       {sites: [kings, leeds, york]}

With ``jobs`` every participant of every job has its own kit, ``DIR/<job>/<party>``, and its
own identity, ``<party>@<job>`` (``kings@sepsis``, ``aggregator@sepsis``): the broker's ACL
grants each identity only its job's topics, so a hospital in two studies runs one agent per
job, and neither agent can read or write the other study's messages. ``@`` is not allowed in
ids, so an identity names its party and job unambiguously.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from medsplit.ids import ID_PATTERN, RESERVED_IDS, check_site_ids
from models.config_errors import load_yaml_mapping, validate

BROKER_ID = "broker"
# DIR/<name> that are not an identity's kit nor a job's folder.
KIT_FOLDERS = frozenset({"ca", "mosquitto", "helm", "bridges"})
JOB_SEPARATOR = "@"
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]

# A frame's payload (256 KiB) and largest header (64 KiB), with room for the topic.
MIN_PACKET_BYTES = 256 * 1024 + 64 * 1024 + 1024


class StudySites(BaseModel):
    """One job of a several-job federation."""

    model_config = ConfigDict(extra="forbid")

    sites: list[Id] = Field(min_length=1, description="site ids of this job")


class BrokerSettings(BaseModel):
    """Where a provisioned broker listens, where it finds its files, whom it runs as."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(8883, ge=1, le=65535, description="the broker's TLS port")
    bind_address: str | None = Field(None, description="listen on this address only")
    broker_dir: Path | None = Field(
        None,
        description="where the broker will find its provisioned files (e.g. /mosquitto/config "
        "in a container); default: the provisioned folder itself",
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


class HospitalBroker(BrokerSettings):
    """A Mosquitto inside one hospital, bridged to the central broker (``bridge_files``)."""

    hosts: list[str] = Field(
        ["localhost", "127.0.0.1"],
        min_length=1,
        description="names (or IPs) the hospital's agents use for it; the first goes into their "
        "kits",
    )
    remote: str | None = Field(
        None,
        pattern=r"^[^\s:]+:[0-9]{1,5}$",
        description="HOST:PORT of the central broker as the hospital reaches it (a proxy, a "
        "firewall's address); default the first broker_hosts and port",
    )
    restart_min_s: int = Field(1, ge=1, description="first wait before reconnecting the link")
    restart_max_s: int = Field(15, ge=1, description="longest wait between reconnect attempts")
    keepalive_s: int = Field(30, ge=5, description="MQTT keepalive of the link")

    @property
    def url(self) -> str:
        return f"mqtts://{self.hosts[0]}:{self.port}"


@dataclass(frozen=True)
class Study:
    """One job as its kits see it: where each party's kit is and which identity it carries."""

    job_id: str
    sites: tuple[str, ...]
    qualified: bool  # part of a several-job federation: identities are party@job

    def identity(self, party: str) -> str:
        """The certificate CN (and broker username) of ``party`` (a site or ``aggregator``)."""
        return f"{party}{JOB_SEPARATOR}{self.job_id}" if self.qualified else party

    def kit(self, out: Path, party: str) -> Path:
        return out / self.job_id / party if self.qualified else out / party


class Federation(BrokerSettings):
    """One federation: its jobs and their sites, where its broker is, how long certificates
    live."""

    job_id: Id | None = Field(
        None, description="the one job the kits are for (or use jobs); part of every topic"
    )
    sites: list[Id] | None = Field(
        None, description="the one job's site ids: each one's certificate CN"
    )
    jobs: dict[Id, StudySites] | None = Field(
        None,
        description="several jobs on one broker, instead of job_id and sites: job id -> "
        "{sites: [...]}; every party's identity is PARTY@JOB and its kit DIR/JOB/PARTY",
    )
    broker_hosts: list[str] = Field(
        min_length=1,
        description="names (or IPs) clients use for the broker; all go into its certificate, "
        "the first into the kits' broker URL",
    )
    validity_days: float = Field(
        30, gt=0, le=397, description="lifetime of the broker, aggregator and site certificates"
    )
    ca_validity_days: float = Field(1095, gt=1, description="lifetime of the CA")
    hospital_brokers: dict[Id, HospitalBroker] = Field(
        default_factory=dict,
        description="site id -> a broker inside that hospital, bridged to this one over one "
        "outbound connection: the site's kits connect to it (docs/security.md)",
    )
    helm_namespace: str | None = Field(
        None,
        pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        description="also write DIR/helm (values and Secrets for both charts) for this "
        "Kubernetes namespace; the broker's certificate then names its in-cluster service too",
    )

    @model_validator(mode="after")
    def _one_form(self) -> Federation:
        single = self.job_id is not None or self.sites is not None
        if single and self.jobs is not None:
            raise ValueError("give either job_id and sites (one job) or jobs (several), not both")
        if self.jobs is None and (self.job_id is None or not self.sites):
            raise ValueError("job_id and sites (at least one) are required, or jobs")
        reserved = RESERVED_IDS | KIT_FOLDERS | {BROKER_ID}
        if self.jobs is not None:
            if not self.jobs:
                raise ValueError("jobs: give at least one job")
            taken = sorted(set(self.jobs) & reserved)
            if taken:
                raise ValueError(f"jobs: {', '.join(taken)} is reserved and cannot be a job id")
        for study in self.studies():
            check_site_ids(list(study.sites), reserved)
        members = {site for study in self.studies() for site in study.sites}
        strangers = sorted(set(self.hospital_brokers) - members)
        if strangers:
            raise ValueError(f"hospital_brokers: {', '.join(strangers)} is in no job")
        return self

    def site_broker_url(self, site: str) -> str:
        """Where ``site``'s agents connect: its hospital broker, or the central broker."""
        spec = self.hospital_brokers.get(site)
        return spec.url if spec is not None else self.broker_url

    def studies(self) -> list[Study]:
        if self.jobs is None:
            # The validator makes both present in this form.
            return [Study(self.job_id or "", tuple(self.sites or ()), qualified=False)]
        return [Study(job, tuple(s.sites), qualified=True) for job, s in self.jobs.items()]

    def study(self, job_id: str) -> Study:
        for study in self.studies():
            if study.job_id == job_id:
                return study
        raise KeyError(job_id)

    @property
    def name(self) -> str:
        """What the CA and the broker's files call this federation."""
        return self.job_id or f"{len(self.jobs or {})}-job federation"

    @property
    def broker_url(self) -> str:
        return f"mqtts://{self.broker_hosts[0]}:{self.port}"


def load_federation(path: Path) -> Federation:
    federation: Federation = validate(Federation, load_yaml_mapping(path), str(path))
    return federation


def split_identity(identity: str) -> tuple[str, str | None]:
    """``party@job`` -> (party, job); a single-job identity -> (identity, None)."""
    party, separator, job = identity.partition(JOB_SEPARATOR)
    return (party, job) if separator else (identity, None)
