"""``medsplit probe`` and ``medsplit status``: asking a running process over its HTTP port.

``probe`` is a container's ``HEALTHCHECK`` (exit 0 when ``/readyz`` says ready); ``status``
prints what ``/status`` says of a job as a table in the terminal -- the same state the status
page shows. Both use the standard library's HTTP client: no dependency for a one-shot GET.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from medsplit.http_guard import read_token
from models.config_errors import ConfigError


class Unanswered(Exception):
    """The process did not answer, or not with JSON."""


def get_json(
    url: str,
    timeout: float,
    *,
    context: ssl.SSLContext | None = None,
    token: str | None = None,
) -> tuple[int, Any]:
    """The status code and JSON body of ``GET url`` (an error status is an answer, too);
    ``context`` for HTTPS, ``token`` as ``Authorization: Bearer``."""
    request = urllib.request.Request(url)  # noqa: S310 (http and https only: built here)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {"error": str(exc.reason)}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise Unanswered(f"no answer from {url}: {getattr(exc, 'reason', exc)}") from None


def _default_url(path: str) -> str:
    """This container's own port: HTTPS when the process serves it (``MEDSPLIT_HTTP__TLS_CERT``)."""
    scheme = "https" if os.environ.get("MEDSPLIT_HTTP__TLS_CERT") else "http"
    return f"{scheme}://127.0.0.1:{os.environ.get('MEDSPLIT_HTTP__PORT', '8080')}{path}"


def _probe_context(url: str, pinned: str | None) -> ssl.SSLContext | None:
    """A probe asks its own process over loopback whether it is ready. The address is
    127.0.0.1, not a name in the certificate, so the certificate is pinned instead: the server
    must show exactly ``pinned`` (``--cert-file``, else the process's own
    ``MEDSPLIT_HTTP__TLS_CERT``), verified as a trust anchor of its own."""
    if not url.startswith("https://"):
        return None
    pinned = pinned or os.environ.get("MEDSPLIT_HTTP__TLS_CERT")
    if not pinned:
        raise ConfigError(
            "probe", [("--cert-file", "an https URL needs the server's certificate to pin")]
        )
    context = ssl.create_default_context(cafile=pinned)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf itself is the anchor
    context.check_hostname = False  # 127.0.0.1: the pinned certificate stands for the name
    return context


def _client_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """HTTPS as ``medsplit status`` is told: the CA that signed the server, and a client
    certificate when the port asks for one."""
    if not args.url.startswith("https://"):
        return None
    context = ssl.create_default_context(cafile=args.ca_file)
    if args.cert is not None:
        context.load_cert_chain(args.cert, args.key)
    return context


def cmd_probe(args: argparse.Namespace) -> int:
    url = args.url or _default_url("/readyz")
    try:
        context = _probe_context(url, args.cert_file)
    except (ConfigError, OSError) as exc:  # no certificate to pin, or not a readable PEM
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        code, body = get_json(url, args.timeout, context=context)
    except Unanswered as exc:
        print(exc, file=sys.stderr)
        return 1
    checks = body.get("checks", {}) if isinstance(body, dict) else {}
    if code != 200:
        reasons = "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok")
        print(f"not ready ({url}): {reasons or body}", file=sys.stderr)
        return 1
    print(f"ready ({url}): {', '.join(checks)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/") + "/status"
    if (args.cert is None) != (args.key is None):
        print("error: --cert and --key go together", file=sys.stderr)
        return 2
    try:
        token = read_token(args.token_file, "--token-file") if args.token_file else None
        context = _client_context(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a CA or certificate file missing or not PEM
        print(f"error: TLS files: {exc}", file=sys.stderr)
        return 2
    try:
        code, body = get_json(url, args.timeout, context=context, token=token)
    except Unanswered as exc:
        print(exc, file=sys.stderr)
        return 1
    if code != 200 or not isinstance(body, dict):
        print(f"{url} answered {code}: {body}", file=sys.stderr)
        return 1
    from rich.console import Console  # noqa: PLC0415 (`medsplit --help` stays light)

    Console().print(*render_status(body))
    return 0


def render_status(status: dict[str, Any]) -> list[Any]:
    """A heading, the site table and the last rounds, as rich renderables."""
    from rich.table import Table  # noqa: PLC0415

    rounds, done = status.get("rounds"), status.get("rounds_completed", 0)
    heading = (
        f"[bold]{status.get('job_id')}[/bold]  {status.get('mode', '')} "
        f"{status.get('orchestration', '')}  phase [bold]{status.get('phase')}[/bold]  "
        f"rounds {done}/{rounds}"
    )
    waiting = status.get("waiting_for") or []
    if waiting:
        heading += f"  waiting for {', '.join(waiting)}"
        if status.get("late"):
            heading += f" [red](late: {status['late']})[/red]"
    sites = Table(title="sites")
    columns = (
        *("site", "state", "samples", "last seen", "MB up", "MB down", "accuracy", "loss"),
        "epsilon",
    )
    for column in (*columns, "why"):
        sites.add_column(column, justify="right" if column in columns[2:] else "left")
    for site, entry in status.get("sites", {}).items():
        metrics = entry.get("last_metrics") or {}
        seen = entry.get("last_seen_s_ago")
        sites.add_row(
            site,
            entry.get("state", "?"),
            str(entry.get("train_samples", "")),
            "-" if seen is None else f"{seen:.0f} s ago",
            f"{entry.get('bytes', {}).get('up', 0) / 1e6:.2f}",
            f"{entry.get('bytes', {}).get('down', 0) / 1e6:.2f}",
            _fmt(metrics.get("accuracy")),
            _fmt(metrics.get("loss")),
            _fmt(metrics.get("epsilon")),
            entry.get("note", ""),
        )
    history = Table(title="rounds (from 0, as in report.json)")
    for column in ("round", "mean accuracy", "mean loss", "seconds", "missed"):
        history.add_column(column, justify="right")
    for record in status.get("history", [])[-10:]:
        mean = record.get("mean") or {}
        history.add_row(
            str(record.get("round")),
            _fmt(mean.get("accuracy")),
            _fmt(mean.get("loss")),
            f"{record.get('seconds', 0):.1f}",
            ", ".join(record.get("missed", [])) or "-",
        )
    return [heading, sites, history]


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def add_http_commands(commands: Any) -> None:
    probe = commands.add_parser(
        "probe", help="exit 0 when a process's /readyz says ready (a container's HEALTHCHECK)"
    )
    probe.add_argument(
        "--url", help="default: http://127.0.0.1:$MEDSPLIT_HTTP__PORT/readyz (port 8080)"
    )
    probe.add_argument("--timeout", type=float, default=3.0, help="seconds")
    probe.add_argument(
        "--cert-file",
        help="HTTPS: the certificate the process serves, pinned (default: "
        "$MEDSPLIT_HTTP__TLS_CERT)",
    )
    probe.set_defaults(func=cmd_probe)
    status = commands.add_parser(
        "status", help="what a running aggregator says of its job, as a table (its /status)"
    )
    status.add_argument("--url", required=True, help="the aggregator's http(s)://HOST:PORT")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds")
    status.add_argument("--token-file", type=Path, help="a file holding the port's bearer token")
    status.add_argument("--ca-file", help="HTTPS: the CA that signed the aggregator's certificate")
    status.add_argument("--cert", help="HTTPS: a client certificate (PEM), when the port asks")
    status.add_argument("--key", help="and its private key (PEM)")
    status.set_defaults(func=cmd_status)
