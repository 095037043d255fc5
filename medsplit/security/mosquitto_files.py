"""The broker's side of a federation: ``mosquitto.conf`` and the ACL, as text.

The ACL grants each certificate identity (``use_identity_as_username``: the CN) exactly what
the protocol needs, one ``user`` block per identity, so that revoking a site removes its block
and, after a reload, even its open connection can neither publish nor receive:

* a site writes its own ``up/KIND`` for the protocol's uplink kinds only (so the topics it
  could leave a retained message on are a handful, not ``up/+``'s unbounded number) and its
  presence, and reads its own ``down/+``, ``all/+`` and the aggregator's presence;
* the aggregator reads every site's ``up/+`` and presence and may write there too: it deletes
  any message a site published with the retain flag (the protocol retains only presence), so
  a site cannot park data on the broker; it writes every ``down/+`` and ``all/+``, and reads
  and writes its own presence (the liveness probe);
* nobody is granted ``#``, and an identity without a block is granted nothing;
* in a several-job federation every identity is ``party@job`` and its block names only its
  job's topics: a hospital's agent of one study reads and writes nothing of another.

``max_packet_size`` bounds every message a client can make the broker hold to the federation's
``max_packet_bytes`` (1 MiB by default: frames are at most 320 KiB).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medsplit.ids import AGGREGATOR_ID
from medsplit.protocol import topics
from medsplit.protocol.meta import CUT_LAYER_UPLINK, UPLINK, VERTICAL_UPLINK
from medsplit.security import bridge_files

UPLINK_KINDS = UPLINK | CUT_LAYER_UPLINK | VERTICAL_UPLINK

if TYPE_CHECKING:
    from medsplit.security.federation import BrokerSettings, Federation, Study


def acl(federation: Federation) -> str:
    lines = [
        f"# medsplit ACL for {_jobs(federation)}: written by `medsplit provision`; "
        "regenerate it, never edit it.",
        "# Usernames are certificate CNs. What is not granted here is denied.",
    ]
    for study in federation.studies():
        lines += study_acl(study)
    lines += bridge_files.central_acl(federation)
    return "\n".join(lines) + "\n"


def study_acl(study: Study) -> list[str]:
    """One job's blocks: its aggregator's and each of its sites', every topic under the job."""
    job = f"{topics.PREFIX}/{study.job_id}"
    lines = [
        "",
        f"user {study.identity(AGGREGATOR_ID)}",
        f"topic readwrite {job}/+/up/+",
        f"topic read {job}/+/presence",
        f"topic write {job}/+/down/+",
        f"topic write {job}/{topics.BROADCAST}/+",
        f"topic readwrite {job}/{AGGREGATOR_ID}/presence",
    ]
    for site in study.sites:
        lines += site_block(study, site)
    return lines


def site_block(study: Study, site: str) -> list[str]:
    """A site's block: exactly its grants (``site_grants``)."""
    writes, reads = site_grants(study.job_id, site)
    return [
        "",
        f"user {study.identity(site)}",
        *(f"topic write {topic}" for topic in writes),
        *(f"topic read {topic}" for topic in reads),
    ]


def site_grants(job_id: str, site: str) -> tuple[list[str], list[str]]:
    """(what a site may publish on, what it may read) in a job: its uplink kinds and presence;
    its downlink, the broadcasts and the aggregator's presence. The ACL and a hospital
    broker's bridge both come from here."""
    job = f"{topics.PREFIX}/{job_id}"
    writes = [
        *(f"{job}/{site}/up/{kind}" for kind in sorted(UPLINK_KINDS)),
        f"{job}/{site}/presence",
    ]
    reads = [
        f"{job}/{site}/down/+",
        f"{job}/{topics.BROADCAST}/+",
        f"{job}/{AGGREGATOR_ID}/presence",
    ]
    return writes, reads


def _jobs(federation: Federation) -> str:
    names = [study.job_id for study in federation.studies()]
    return f"job {names[0]}" if len(names) == 1 else f"jobs {', '.join(names)}"


def config(
    federation: Federation, folder: Path, data: Path | None = None, user: str | None = None
) -> str:
    """``mosquitto.conf`` whose files are in ``folder`` and persistence in ``data`` (default
    ``folder/data``), both as the broker sees them; ``user``: its ``user`` option (default the
    federation's ``broker_user``)."""
    lines = [
        f"# Mosquitto for medsplit {_jobs(federation)}: written by `medsplit provision`.",
        "# Mutual TLS only: every client presents a certificate of this federation's CA, and",
        "# its CN is its username in the ACL. SIGHUP reloads the ACL and the CRL.",
        *broker_lines(federation, folder, data or folder / "data"),
    ]
    user = user or federation.broker_user
    if user:
        lines.append(f"user {user}")
    return "\n".join(lines) + "\n"


def broker_lines(spec: BrokerSettings, folder: Path, data: Path) -> list[str]:
    """What every broker medsplit provisions says, the central one and a hospital's: a
    mutual-TLS listener whose CNs are the ACL's usernames, bounded packets and queues, durable
    sessions, and logs that show connections and reloads."""
    listener = f"listener {spec.port}"
    if spec.bind_address:
        listener += f" {spec.bind_address}"
    return [
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {folder / 'acl'}",
        "",
        listener,
        "protocol mqtt",
        f"cafile {folder / 'ca.pem'}",
        f"certfile {folder / 'server.pem'}",
        f"keyfile {folder / 'server.key'}",
        f"crlfile {folder / 'crl.pem'}",
        "require_certificate true",
        "use_identity_as_username true",
        "tls_version tlsv1.2",
        # Without it every small message waits for Nagle: rounds ran 15x slower.
        "set_tcp_nodelay true",
        # No client makes the broker hold more than this per message (bigger: disconnected).
        f"max_packet_size {spec.max_packet_bytes}",
        "",
        "persistence true",
        f"persistence_location {data}/",
        "autosave_interval 30",
        # Clients briefly offline (or a hospital's link while it is down) get what was sent
        # meanwhile; bounded, not unlimited.
        "max_queued_messages 100000",
        "max_inflight_messages 0",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",  # includes "Reloading config.", which says SIGHUP was taken
        "connection_messages true",
    ]
