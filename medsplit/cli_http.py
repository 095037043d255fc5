"""``medsplit probe`` and ``medsplit status``: asking a running process over its HTTP port.

``probe`` is a container's ``HEALTHCHECK`` (exit 0 when ``/readyz`` says ready); ``status``
prints what ``/status`` says of a job as a table in the terminal -- the same state the status
page shows. Both use the standard library's HTTP client: no dependency for a one-shot GET.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any


class Unanswered(Exception):
    """The process did not answer, or not with JSON."""


def get_json(url: str, timeout: float) -> tuple[int, Any]:
    """The status code and JSON body of ``GET url`` (an error status is an answer, too)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http only)
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {"error": str(exc.reason)}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise Unanswered(f"no answer from {url}: {getattr(exc, 'reason', exc)}") from None


def _default_url(path: str) -> str:
    return f"http://127.0.0.1:{os.environ.get('MEDSPLIT_HTTP__PORT', '8080')}{path}"


def cmd_probe(args: argparse.Namespace) -> int:
    url = args.url or _default_url("/readyz")
    try:
        code, body = get_json(url, args.timeout)
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
    try:
        code, body = get_json(url, args.timeout)
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
    probe.set_defaults(func=cmd_probe)
    status = commands.add_parser(
        "status", help="what a running aggregator says of its job, as a table (its /status)"
    )
    status.add_argument("--url", required=True, help="the aggregator's http://HOST:PORT")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds")
    status.set_defaults(func=cmd_status)
