"""The comparison an experiment produces: tables (markdown and CSV) and plots.

Each row is one method on one (partition, site count), summarised over seeds as mean +- std of
the last round's mean per-site held-out accuracy and AUROC, bytes each site sent and received
over the whole job, and wall time. ``cells.csv`` keeps every single run for re-analysis.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

from experiments.config import Cell, ExperimentConfig
from experiments.runner import CellResult
from medsplit.storage import atomic_write

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


@dataclass(frozen=True)
class Spread:
    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: list[float | None]) -> Spread:
        present = [v for v in values if v is not None]
        if not present:
            return cls(None, None, 0)
        std = statistics.stdev(present) if len(present) > 1 else 0.0
        return cls(statistics.fmean(present), std, len(present))

    def text(self, digits: int = 3, scale: float = 1.0) -> str:
        if self.mean is None or self.std is None:
            return "-"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


@dataclass(frozen=True)
class Row:
    partition: str
    sites: int
    method: str
    runs: int
    failed: int
    accuracy: Spread
    auroc: Spread
    balanced: Spread  # pooled over the sites' held-out records
    pooled_auroc: Spread
    mb_up: Spread
    mb_down: Spread
    seconds: Spread
    float32_method: str | None = None  # the same method with a float32 wire, for a narrower one


def summarize(results: list[CellResult]) -> list[Row]:
    groups: dict[tuple[str, int, str], list[CellResult]] = defaultdict(list)
    for result in results:
        cell = result.cell
        groups[(cell.partition, cell.sites, cell.method)].append(result)
    rows = []
    for (partition, sites, method), members in groups.items():
        done = [r for r in members if r.status == "completed"]
        rows.append(
            Row(
                partition,
                sites,
                method,
                runs=len(members),
                failed=len(members) - len(done),
                accuracy=Spread.of([r.final()["accuracy"] for r in done]),
                auroc=Spread.of([r.final()["auroc"] for r in done]),
                balanced=Spread.of([r.pooled().get("balanced_accuracy") for r in done]),
                pooled_auroc=Spread.of([r.pooled().get("macro_auroc") for r in done]),
                mb_up=Spread.of([r.bytes_per_site("up") / 1e6 for r in done]),
                mb_down=Spread.of([r.bytes_per_site("down") / 1e6 for r in done]),
                seconds=Spread.of([r.wall_time_s for r in done]),
                float32_method=_float32_method(members[0].cell),
            )
        )
    return rows


def _float32_method(cell: Cell) -> str | None:
    if cell.wire_dtype == "float32":
        return None
    return replace(cell, wire_dtype="float32").method


def _cost(row: Row, accuracy: dict[str, Spread]) -> str:
    """Accuracy points lost (negative) or gained against the same method with a float32 wire."""
    base = accuracy.get(row.float32_method or "")
    if base is None or base.mean is None or row.accuracy.mean is None:
        return "-"
    return f"{100 * (row.accuracy.mean - base.mean):+.2f}"


def markdown(config: ExperimentConfig, rows: list[Row]) -> str:
    lines = [
        f"# Experiment {config.name}",
        "",
        f"Dataset `{config.dataset}`, {config.rounds} rounds x {config.local_epochs} local epoch(s), "
        f"batch {config.batch_size}, {config.optimizer.name} lr {config.optimizer.lr:g}, "
        f"seeds {config.seeds}, wire {', '.join(config.wire_dtypes)}. Accuracy and AUROC: mean "
        "over sites of the held-out metrics after the last round, then mean ± std over seeds. "
        "Pooled: balanced accuracy and macro AUROC of every site's held-out records together "
        "(from the counts the sites sent). "
        "vs float32: accuracy points against the same method with a float32 wire. MB: bytes "
        "each site sent (up) and received (down) over the whole job, mean per site.",
        "",
    ]
    by_setting: dict[tuple[str, int], list[Row]] = defaultdict(list)
    for row in rows:
        by_setting[(row.partition, row.sites)].append(row)
    for (partition, sites), members in by_setting.items():
        lines += [
            f"## {partition}, {sites} sites",
            "",
            "| method | accuracy | vs float32 | AUROC | pooled balanced accuracy | pooled AUROC "
            "| MB up / site | MB down / site | wall s | runs |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        accuracy = {row.method: row.accuracy for row in members}
        for row in members:
            runs = f"{row.runs - row.failed}/{row.runs}"
            lines.append(
                f"| {row.method} | {row.accuracy.text()} | {_cost(row, accuracy)} | "
                f"{row.auroc.text()} | {row.balanced.text()} | {row.pooled_auroc.text()} | "
                f"{row.mb_up.text(2)} | {row.mb_down.text(2)} | {row.seconds.text(1)} | {runs} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_results(config: ExperimentConfig, results: list[CellResult]) -> list[Path]:
    """Write results.md, summary.csv, cells.csv and the plots; return the paths written."""
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results)
    written = [out / "results.md", out / "summary.csv", out / "cells.csv"]
    atomic_write(written[0], markdown(config, rows).encode())
    _write_summary_csv(written[1], rows)
    _write_cells_csv(written[2], results)
    written += plot(config, results, rows)
    return written


def _write_csv(path: Path, rows: list[list[object]]) -> None:
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    atomic_write(path, text.getvalue().encode())


def _write_summary_csv(path: Path, rows: list[Row]) -> None:
    header = ["partition", "sites", "method", "runs", "failed"]
    for name in ("accuracy", "auroc", "balanced", "pooled_auroc", "mb_up", "mb_down", "seconds"):
        header += [f"{name}_mean", f"{name}_std"]
    table: list[list[object]] = [list(header)]
    for row in rows:
        values: list[object] = [row.partition, row.sites, row.method, row.runs, row.failed]
        spreads = (row.accuracy, row.auroc, row.balanced, row.pooled_auroc, row.mb_up)
        for spread in (*spreads, row.mb_down, row.seconds):
            values += [spread.mean, spread.std]
        table.append(values)
    _write_csv(path, table)


CELL_COLUMNS = (
    *("method", "partition", "sites", "seed", "status", "accuracy", "auroc"),
    *("bytes_up_per_site", "bytes_down_per_site", "wall_time_s", "error"),
)


def _write_cells_csv(path: Path, results: list[CellResult]) -> None:
    table: list[list[object]] = [list(CELL_COLUMNS)]
    for r in results:
        final, cell = r.final(), r.cell
        table.append(
            [
                *(cell.method, cell.partition, cell.sites, cell.seed, r.status),
                *(final["accuracy"], final["auroc"]),
                *(r.bytes_per_site("up"), r.bytes_per_site("down"), round(r.wall_time_s, 3)),
                r.error,
            ]
        )
    _write_csv(path, table)


def plot(config: ExperimentConfig, results: list[CellResult], rows: list[Row]) -> list[Path]:
    """Per (partition, site count): accuracy per round per method, and bytes per site."""
    written = []
    settings = sorted({(r.cell.partition, r.cell.sites) for r in results})
    for partition, sites in settings:
        members = [
            r
            for r in results
            if (r.cell.partition, r.cell.sites) == (partition, sites) and r.status == "completed"
        ]
        if not members:
            continue
        fig, (curves, traffic) = plt.subplots(1, 2, figsize=(12, 4.5))
        methods = list(dict.fromkeys(r.cell.method for r in members))
        for method in methods:
            runs = [r for r in members if r.cell.method == method]
            per_round = [
                Spread.of([r.history[i].mean()["accuracy"] for r in runs if len(r.history) > i])
                for i in range(config.rounds)
            ]
            curves.plot(
                range(1, config.rounds + 1), [s.mean for s in per_round], marker="o", label=method
            )
        curves.set_xlabel("round")
        curves.xaxis.set_major_locator(MaxNLocator(integer=True))
        curves.set_ylabel("mean held-out accuracy over sites")
        curves.grid(alpha=0.3)
        curves.legend(fontsize=8)
        setting_rows = [r for r in rows if (r.partition, r.sites) == (partition, sites)]
        names = [r.method for r in setting_rows]
        ups = [r.mb_up.mean or 0.0 for r in setting_rows]
        downs = [r.mb_down.mean or 0.0 for r in setting_rows]
        positions = range(len(names))
        traffic.bar([p - 0.2 for p in positions], ups, width=0.4, label="up")
        traffic.bar([p + 0.2 for p in positions], downs, width=0.4, label="down")
        traffic.set_xticks(list(positions), names, rotation=30, ha="right", fontsize=8)
        traffic.set_ylabel("MB per site over the job")
        traffic.legend(fontsize=8)
        traffic.grid(alpha=0.3, axis="y")
        fig.suptitle(f"{config.name}: {config.dataset}, {partition}, {sites} sites")
        fig.tight_layout()
        safe = partition.replace(":", "-")
        path = config.output_dir / f"{safe}-{sites}sites.png"
        image = io.BytesIO()
        fig.savefig(image, format="png", dpi=100)
        plt.close(fig)
        atomic_write(path, image.getvalue())
        written.append(path)
    return written
