"""A broker inside a hospital: Mosquitto at the edge, bridged to the central broker.

A hospital network often lets one outbound connection through its firewall, and its WAN link
drops now and then. With a hospital broker the hospital's agents connect to a Mosquitto on the
hospital's own network; that broker holds one outbound connection (mutual TLS, its own
certificate, ``bridge:SITE``) to the central broker and carries exactly that hospital's topics:

* out (hospital -> centre): the site's uplink kinds and its presence, in every job it is in;
* in (centre -> hospital): the site's own downlink, the jobs' broadcasts, the aggregators'
  presence.

Both ends enforce the same boundary: the central ACL grants ``bridge:SITE`` the site's own
rights and nothing more, and the hospital broker's ACL grants its clients (the site's own
identities) the same, so no other hospital's message can reach the hospital broker, and the
hospital broker cannot publish as another hospital. While the link is down both sides queue:
the bridge's sessions are persistent (``cleansession false``), QoS 1 both ways, so an agent
keeps publishing to its local broker and the job resumes when the link returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medsplit.security import mosquitto_files

if TYPE_CHECKING:
    from medsplit.security.federation import Federation, HospitalBroker, Study

BRIDGE_PREFIX = "bridge:"  # ':' is not allowed in ids: no site can take these names
HOSPITAL_BROKER_PREFIX = "broker:"


def bridge_identity(site: str) -> str:
    return f"{BRIDGE_PREFIX}{site}"


def hospital_broker_identity(site: str) -> str:
    return f"{HOSPITAL_BROKER_PREFIX}{site}"


def central_acl(federation: Federation) -> list[str]:
    """The central broker's blocks for the bridges: each the rights of its site, in every job."""
    lines: list[str] = []
    for site in federation.hospital_brokers:
        lines += ["", f"user {bridge_identity(site)}"]
        for study in _studies_of(federation, site):
            writes, reads = mosquitto_files.site_grants(study.job_id, site)
            lines += [f"topic write {t}" for t in writes] + [f"topic read {t}" for t in reads]
    return lines


def hospital_acl(federation: Federation, site: str) -> str:
    """The hospital broker's ACL: the site's own identities, with the site's rights."""
    lines = [
        f"# medsplit ACL of the hospital broker of {site}: written by `medsplit provision`.",
        "# Only this hospital's agents connect here, one identity per job; the bridge to the",
        "# central broker carries nothing else.",
    ]
    for study in _studies_of(federation, site):
        lines += mosquitto_files.site_block(study, site)
    return "\n".join(lines) + "\n"


def hospital_config(federation: Federation, site: str, spec: HospitalBroker, folder: Path) -> str:
    """``mosquitto.conf`` of ``site``'s hospital broker as it will run (``spec``: its settings
    there, e.g. in a pod): a mutual-TLS listener for the hospital's agents and one bridge to the
    central broker; ``folder`` is where it sees its files."""
    lines = [
        f"# The hospital broker of {site}: written by `medsplit provision`; regenerate it.",
        "# Only this hospital's agents connect here; one bridge carries its topics to the",
        "# central broker, and nothing else.",
        *mosquitto_files.broker_lines(spec, folder, spec.broker_data_dir or folder / "data"),
        *([f"user {spec.broker_user}"] if spec.broker_user else []),
        "",
        *bridge_section(federation, site, spec, folder),
    ]
    return "\n".join(lines) + "\n"


def bridge_section(
    federation: Federation, site: str, spec: HospitalBroker, folder: Path
) -> list[str]:
    lines = [
        f"connection medsplit-{site}",
        f"address {remote_address(federation, spec)}",
        "bridge_protocol_version mqttv311",
        f"bridge_cafile {folder / 'ca.pem'}",
        f"bridge_certfile {folder / 'bridge.pem'}",
        f"bridge_keyfile {folder / 'bridge.key'}",
        "bridge_tls_version tlsv1.2",
        # One session each side that outlives the link: what is sent while it is down waits.
        f"remote_clientid bridge-{site}",
        "cleansession false",
        "local_cleansession false",
        "try_private false",
        "notifications false",  # its state topic is outside the ACL: the link says nothing
        "start_type automatic",
        f"restart_timeout {spec.restart_min_s} {spec.restart_max_s}",
        f"keepalive_interval {spec.keepalive_s}",
    ]
    for study in _studies_of(federation, site):
        writes, reads = mosquitto_files.site_grants(study.job_id, site)
        lines += [f"topic {t} out 1" for t in writes] + [f"topic {t} in 1" for t in reads]
    return lines


def remote_address(federation: Federation, spec: HospitalBroker) -> str:
    return spec.remote or f"{federation.broker_hosts[0]}:{federation.port}"


def _studies_of(federation: Federation, site: str) -> list[Study]:
    return [study for study in federation.studies() if site in study.sites]
