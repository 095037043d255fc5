"""The run report for a person: curves.png and report.html, drawn from report.json alone."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest

from aggregator.report_page import curves_figure, report_html
from medsplit.cli import main

SITES = ["hospital-a", "hospital-b", "hospital-c"]


def _report() -> dict[str, Any]:
    """Three rounds; a and b score alike (they would hide each other); c missed round 1."""
    history = []
    for r in range(3):
        sites = {
            s: {"loss": 0.5 - 0.1 * r, "accuracy": 0.7 + 0.1 * r, "auroc": 0.8, "samples": 40}
            for s in SITES
            if not (s == "hospital-c" and r == 1)
        }
        history.append(
            {
                "round": r,
                "seconds": 2.0 + r,
                "train_seconds": 1.5,
                "mean": {"loss": 0.5 - 0.1 * r, "accuracy": 0.7 + 0.1 * r},
                "sites": sites,
                "compute_seconds": dict.fromkeys(sites, 0.5),
                "missed": [] if r != 1 else ["hospital-c"],
                "resumed": r == 2,
                "bytes": {s: {"up": 1_000_000, "down": 500_000} for s in sites},
            }
        )
    return {
        "job_id": "<b>trial</b>",
        "status": "completed",
        "mode": "split-u",
        "orchestration": "parallel",
        "dataset": "breast-cancer",
        "model": "mlp",
        "sites": SITES,
        "rounds": 3,
        "seed": 0,
        "history": history,
        "final": history[-1],
        "bytes": {s: {"up": 3_000_000, "down": 1_000_000} for s in SITES},
        "late_messages": 2,
        "wall_time_s": 9.5,
        "faults": {"resumed_at": [2], "rejected": {"BadDigest": 3}, "revoked": []},
    }


class _Page(HTMLParser):
    """The tables (rows of cell texts), the image sources and every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.urls: list[str] = []
        self.meta: dict[str, str] = {}
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.urls += [v or "" for k, v in attrs if k in {"src", "href", "action"}]
        if tag == "meta" and found.get("http-equiv"):
            self.meta[found["http-equiv"] or ""] = found.get("content") or ""
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in {"td", "th"}:
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in {"td", "th"} and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None


def test_the_curves_number_rounds_from_0_keep_every_site_visible_and_label_both_panels() -> None:
    fig = curves_figure(_report())
    try:
        for ax in fig.axes:
            legend = ax.get_legend()
            assert legend is not None
            assert [t.get_text() for t in legend.get_texts()] == [*SITES, "mean"]
            lines = {line.get_label(): line for line in ax.get_lines()}
            assert list(lines["mean"].get_xdata()) == [0, 1, 2]  # as report.json numbers them
            markers = {lines[s].get_marker() for s in SITES}
            assert len(markers) == len(SITES)
            xs = [tuple(lines[s].get_xdata()) for s in SITES]
            assert len(set(xs)) == len(SITES)  # a and b score alike but sit side by side
            assert all(abs(x - r) < 0.5 for x_row in xs for r, x in enumerate(x_row))
            c = list(lines["hospital-c"].get_ydata())
            assert c[1] != c[1]  # the missed round is a gap (NaN), not a zero
    finally:
        plt.close(fig)


def test_the_page_has_setup_curves_final_rounds_traffic_timings_and_faults() -> None:
    page = _Page()
    page.feed(report_html(_report(), b"\x89PNG fake"))
    setup, final, rounds, traffic, timings, faults = page.tables
    assert ["mode", "split-u"] in setup and ["sites", ", ".join(SITES)] in setup
    assert [row[0] for row in final[1:]] == [*SITES, "mean"]
    assert final[1][2] == "0.9000"  # accuracy of round 2
    assert [row[0] for row in rounds[1:]] == ["0", "1", "2"]
    assert rounds[2][6] == "hospital-c" and rounds[3][7] == "resumed"
    assert rounds[1][5] == "4.50"  # MB in round 0: 3 sites x 1.5 MB
    assert [row[0] for row in traffic[1:]] == SITES and traffic[1][3] == "33%"
    assert ["round, slowest s", "4.0000"] in timings
    assert ["missed rounds", "hospital-c (round 1)"] in faults
    assert ["rejected", "BadDigest: 3"] in faults and ["late replies dropped", "2"] in faults
    (image,) = page.urls
    assert base64.b64decode(image.removeprefix("data:image/png;base64,")) == b"\x89PNG fake"
    assert "default-src 'none'" in page.meta["Content-Security-Policy"]


def test_what_the_report_says_is_shown_as_text_never_as_markup() -> None:
    html = report_html(_report(), b"")
    assert "<b>trial</b>" not in html and "&lt;b&gt;trial&lt;/b&gt;" in html


def test_medsplit_report_redraws_a_run_and_names_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "report.json").write_text(json.dumps(_report()))
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert "hospital-c (round 1)" in (tmp_path / "report.html").read_text()
    broken = {k: v for k, v in _report().items() if k != "history"}
    (tmp_path / "report.json").write_text(json.dumps(broken))
    assert main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path / 'report.json'}: history: missing" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "cannot read it" in capsys.readouterr().err
