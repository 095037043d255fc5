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
* nobody is granted ``#``, and an identity without a block is granted nothing.

``max_packet_size`` bounds every message a client can make the broker hold to the federation's
``max_packet_bytes`` (1 MiB by default: frames are at most 320 KiB).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medsplit.ids import AGGREGATOR_ID
from medsplit.protocol import topics
from medsplit.protocol.meta import CUT_LAYER_UPLINK, UPLINK

UPLINK_KINDS = UPLINK | CUT_LAYER_UPLINK

if TYPE_CHECKING:
    from medsplit.security.provision import Federation


def acl(federation: Federation) -> str:
    job = f"{topics.PREFIX}/{federation.job_id}"
    lines = [
        f"# medsplit ACL for job {federation.job_id}: written by `medsplit provision`; "
        "regenerate it, never edit it.",
        "# Usernames are certificate CNs. What is not granted here is denied.",
        "",
        f"user {AGGREGATOR_ID}",
        f"topic readwrite {job}/+/up/+",
        f"topic read {job}/+/presence",
        f"topic write {job}/+/down/+",
        f"topic write {job}/{topics.BROADCAST}/+",
        f"topic readwrite {job}/{AGGREGATOR_ID}/presence",
    ]
    for site in federation.sites:
        lines += [
            "",
            f"user {site}",
            *(f"topic write {job}/{site}/up/{kind}" for kind in sorted(UPLINK_KINDS)),
            f"topic write {job}/{site}/presence",
            f"topic read {job}/{site}/down/+",
            f"topic read {job}/{topics.BROADCAST}/+",
            f"topic read {job}/{AGGREGATOR_ID}/presence",
        ]
    return "\n".join(lines) + "\n"


def config(
    federation: Federation, folder: Path, data: Path | None = None, user: str | None = None
) -> str:
    """``mosquitto.conf`` whose files are in ``folder`` and persistence in ``data`` (default
    ``folder/data``), both as the broker sees them; ``user``: its ``user`` option (default the
    federation's ``broker_user``)."""
    listener = f"listener {federation.port}"
    if federation.bind_address:
        listener += f" {federation.bind_address}"
    lines = [
        f"# Mosquitto for medsplit job {federation.job_id}: written by `medsplit provision`.",
        "# Mutual TLS only: every client presents a certificate of this federation's CA, and",
        "# its CN is its username in the ACL. SIGHUP reloads the ACL and the CRL.",
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
        f"max_packet_size {federation.max_packet_bytes}",
        "",
        "persistence true",
        f"persistence_location {data or folder / 'data'}/",
        "autosave_interval 30",
        # Sites briefly offline get what was sent meanwhile; bounded, not unlimited.
        "max_queued_messages 100000",
        "max_inflight_messages 0",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",  # includes "Reloading config.", which says SIGHUP was taken
        "connection_messages true",
    ]
    user = user or federation.broker_user
    if user:
        lines.append(f"user {user}")
    return "\n".join(lines) + "\n"
