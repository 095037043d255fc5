"""The run report for a person: ``curves.png`` and a self-contained ``report.html``.

Both are drawn from report.json alone (``medsplit report RUN_DIR`` redraws them for any run), so
what a person reads is what a program reads. The page has no script and loads nothing: the
curves are embedded as a PNG data URI and its Content-Security-Policy forbids every fetch, so it
opens the same from a closed hospital network, a mail attachment or an archive.

Rounds are numbered from 0 everywhere, as in report.json. Sites that reach the same values
would hide one another on the curves, so each has its own marker and line style and sits a
small step to the side of the round it belongs to; the mean is the black line on the round.
"""

from __future__ import annotations

import base64
import io
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsplit.evaluation import NAMES as CLINICAL
from medsplit.storage import atomic_write
from models.config_errors import ConfigError

if TYPE_CHECKING:  # matplotlib loads when a report is drawn: half a second off every start
    from matplotlib.figure import Figure

MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")
LINE_STYLES = ("-", "--", "-.", ":")
SITE_OFFSET = 0.06  # rounds: how far apart neighbouring sites' markers sit
METRICS = ("loss", "accuracy")


REQUIRED = ("job_id", "status", "mode", "orchestration", "dataset", "sites", "history")


def redraw(run_dir: Path) -> Path:
    """``medsplit report RUN_DIR``: the pages of a run, from its report.json, again."""
    path = run_dir / "report.json"
    source = str(path)
    try:
        report = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(source, [("", f"cannot read it ({exc.strerror or exc})")]) from None
    except ValueError as exc:
        raise ConfigError(source, [("", f"not JSON ({exc})")]) from None
    if not isinstance(report, dict):
        raise ConfigError(source, [("", "expected a JSON object (a medsplit run's report)")])
    missing = [(key, "missing: a medsplit run report has it") for key in REQUIRED]
    missing = [(key, why) for key, why in missing if key not in report]
    if missing:
        raise ConfigError(source, missing)
    try:
        write_pages(run_dir, report)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ConfigError(
            source, [("history", f"a round or site entry is malformed ({exc!r})")]
        ) from None
    return run_dir / "report.html"


def write_pages(run_dir: Path, report: Mapping[str, Any]) -> None:
    """``curves.png`` and ``report.html`` of ``report`` into ``run_dir``."""
    png = curves_png(report)
    atomic_write(run_dir / "curves.png", png)
    atomic_write(run_dir / "report.html", report_html(report, png).encode())


def curves_figure(report: Mapping[str, Any]) -> Figure:
    """Held-out loss and accuracy per round: each site, and their mean."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    history = report["history"]
    rounds = [h["round"] for h in history]
    sites = list(report["sites"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, METRICS, strict=True):
        for i, site in enumerate(sites):
            offset = (i - (len(sites) - 1) / 2) * SITE_OFFSET
            values = [_number(h["sites"].get(site, {}).get(metric)) for h in history]
            ax.plot(
                [r + offset for r in rounds],
                values,
                marker=MARKERS[i % len(MARKERS)],
                linestyle=LINE_STYLES[(i // len(MARKERS)) % len(LINE_STYLES)],
                markersize=5,
                alpha=0.8,
                zorder=3,
                label=site,
            )
        means = [_number(h["mean"].get(metric)) for h in history]
        # Under the sites (zorder), so the site on the round itself stays visible.
        ax.plot(rounds, means, color="black", linewidth=2, alpha=0.55, zorder=1, label="mean")
        ax.set_xlabel("round (from 0, as in report.json)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"held-out {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)  # in each panel: a reader looks at one at a time
    fig.suptitle(
        f"{report['job_id']}: {report['mode']}, {report['orchestration']}, {report['dataset']}"
    )
    fig.tight_layout()
    return fig


def curves_png(report: Mapping[str, Any]) -> bytes:
    import matplotlib.pyplot as plt  # noqa: PLC0415 (loaded by curves_figure)

    fig = curves_figure(report)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    return image.getvalue()


def _number(value: object) -> float:
    """A metric for plotting: a missed site's round is a gap, not a zero."""
    return float(value) if isinstance(value, int | float) else math.nan


# -- the page ------------------------------------------------------------------------------------

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #1d2430; }
h1 { font-size: 1.4rem; margin-bottom: .2rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { padding: .3rem .7rem; border-bottom: 1px solid #e4e8ee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.status { padding: .1rem .6rem; border-radius: .7rem; background: #dff3e4; }
.status.failed, .status.interrupted { background: #fde2e1; }
img { max-width: 100%; } .none { color: #56606e; }
"""
# No script, no fetch: the only image is the embedded one.
_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def report_html(report: Mapping[str, Any], curves: bytes) -> str:
    """The whole page: setup, curves, final table, rounds, traffic, timings and faults."""
    status = str(report.get("status", ""))
    sections = [
        f"<h1>{escape(str(report['job_id']))} <span class='status {escape(status)}'>"
        f"{escape(status)}</span></h1>",
        f"<p>{escape(str(report.get('error', '')))}</p>" if report.get("error") else "",
        "<h2>Setup</h2>",
        _table(("setting", "value"), _setup_rows(report)),
        "<h2>Curves</h2>",
        f"<img alt='held-out loss and accuracy per round' "
        f"src='data:image/png;base64,{base64.b64encode(curves).decode()}'>",
        "<h2>Final round</h2>",
        _final_table(report),
        "<h2>Rounds</h2>",
        _table(
            ("round", "mean accuracy", "mean loss", "seconds", "training s", "MB", "missed", ""),
            _round_rows(report["history"]),
        ),
        "<h2>Traffic</h2>",
        _table(("site", "MB up", "MB down", "share of all bytes"), _traffic_rows(report)),
        "<h2>Timings</h2>",
        _table(("measure", "value"), _timing_rows(report)),
        "<h2>Faults</h2>",
        _table(("what", "count or sites"), _fault_rows(report)),
    ]
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_POLICY}\">"
        f"<title>medsplit report: {escape(str(report['job_id']))}</title>"
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def _setup_rows(report: Mapping[str, Any]) -> list[tuple[str, object]]:
    keys = (
        *("mode", "orchestration", "dataset", "model", "partition", "rounds", "local_epochs"),
        *("batch_size", "wire_dtype", "seed", "sealed_segments", "last_checkpoint"),
    )
    rows: list[tuple[str, object]] = [(k.replace("_", " "), report[k]) for k in keys if k in report]
    vertical = report.get("vertical") or {}
    rows += [(f"vertical: {k.replace('_', ' ')}", v) for k, v in vertical.items()]
    return [*rows, ("sites", list(report["sites"]))]


def _final_table(report: Mapping[str, Any]) -> str:
    final = report.get("final")
    if not final:
        return "<p class='none'>no round closed</p>"
    clinical = CLINICAL
    rows: list[tuple[object, ...]] = [
        (
            site,
            m.get("samples"),
            m.get("accuracy"),
            *(m.get(name) for name in clinical),
            m.get("loss"),
            "-" if m.get("epsilon") is None else f"{m['epsilon']:.3g}",
        )
        for site, m in final["sites"].items()
    ]
    mean = final["mean"]
    rows.append(
        (
            "mean",
            None,
            mean.get("accuracy"),
            *(mean.get(n) for n in clinical),
            mean.get("loss"),
            None,
        )
    )
    pooled = final.get("pooled") or {}
    if pooled:
        samples = pooled.get("samples")
        rows.append(
            (
                "pooled",
                None if samples is None else int(samples),
                None,
                *(pooled.get(name) for name in clinical),
                None,
                None,
            )
        )
    title = (
        f"<p>round {final['round']}. <em>pooled</em>: the metrics of every site's held-out "
        "records together, from the counts each site sent (no prediction left a site); "
        "<em>mean</em>: the plain mean of the sites' own.</p>"
    )
    columns = (
        *("site", "held-out samples", "accuracy", "balanced accuracy", "macro AUROC"),
        *("sensitivity", "specificity", "ECE", "loss", "epsilon"),
    )
    return title + _table(columns, rows)


def _round_rows(history: Sequence[Mapping[str, Any]]) -> list[tuple[object, ...]]:
    return [
        (
            h["round"],
            h["mean"].get("accuracy"),
            h["mean"].get("loss"),
            h["seconds"],
            h.get("train_seconds"),
            f"{sum(t['up'] + t['down'] for t in h.get('bytes', {}).values()) / 1e6:.2f}",
            h.get("missed", []),
            "resumed" if h.get("resumed") else "",
        )
        for h in history
    ]


def _traffic_rows(report: Mapping[str, Any]) -> list[tuple[object, ...]]:
    traffic = report.get("bytes", {})
    total = sum(t["up"] + t["down"] for t in traffic.values()) or 1
    return [
        (
            site,
            f"{t['up'] / 1e6:.2f}",
            f"{t['down'] / 1e6:.2f}",
            f"{(t['up'] + t['down']) / total:.0%}",
        )
        for site, t in traffic.items()
    ]


def _timing_rows(report: Mapping[str, Any]) -> list[tuple[str, object]]:
    history = report["history"]
    rows: list[tuple[str, object]] = [("wall time, s", report.get("wall_time_s"))]
    if history:
        seconds = [h["seconds"] for h in history]
        rows += [
            ("round, median s", statistics.median(seconds)),
            ("round, slowest s", max(seconds)),
        ]
    compute: dict[str, float] = {}
    for h in history:
        for site, value in h.get("compute_seconds", {}).items():
            compute[site] = compute.get(site, 0.0) + value
    rows += [(f"{site}: training compute, s", value) for site, value in compute.items()]
    return rows


def _fault_rows(report: Mapping[str, Any]) -> list[tuple[str, object]]:
    faults = report.get("faults", {})
    missed = [
        f"{site} (round {h['round']})" for h in report["history"] for site in h.get("missed", [])
    ]
    rows: list[tuple[str, object]] = [
        ("missed rounds", missed),
        ("late replies dropped", report.get("late_messages", 0)),
    ]
    for key, value in faults.items():
        shown = [f"{k}: {v}" for k, v in value.items()] if isinstance(value, Mapping) else value
        rows.append((key.replace("_", " "), shown))
    return rows
