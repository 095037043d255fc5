"""The privacy sweep's outputs: a table per dataset, every cell as JSON, and a plot.

One row per method and defense, summarised over seeds (mean +- std). "vs none" is the
defended accuracy minus the same method's undefended accuracy, in points. Reconstruction
gain is 1 - MSE(attack) / MSE(guessing the auxiliary mean): 0 means the wire taught the attacker
nothing it did not know, 1 a perfect copy of the records.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

from experiments import doc_sections
from experiments.config import ExperimentConfig
from experiments.privacy.sweep import Measured
from experiments.results import Spread
from medsplit.storage import atomic_write

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DOC = Path(__file__).resolve().parents[2] / "docs" / "privacy.md"
IMAGES = DOC.parent / "img"
LABEL_ATTACKS = (
    "norm",
    "cosine",
    "completion, 10 known",
    "completion, 40 known",
    "completion (plaintext tail)",
)


@dataclass(frozen=True)
class PrivacyRow:
    method: str
    defense: str
    runs: int
    failed: int
    accuracy: Spread
    change: float | None  # accuracy points against the same method undefended
    dcor: Spread
    gain: Spread  # white-box: as if the head travelled in plaintext
    surrogate: Spread  # black-box: a shadow head from the auxiliary slice
    unsplit: Spread  # black-box: UnSplit
    sealed: bool | None
    mse: Spread
    baseline_mse: Spread
    ssim: Spread
    baseline_ssim: Spread
    leaks: dict[str, Spread]
    update_gain: Spread
    update_baseline: Spread
    geiping: Spread
    exposed: float | None
    note: str


def _spread(values: list[float | None]) -> Spread:
    return Spread.of([v for v in values if v is not None and not math.isnan(v)])


def summarize(results: list[Measured]) -> list[PrivacyRow]:
    groups: dict[tuple[str, str], list[Measured]] = defaultdict(list)
    for result in results:
        groups[(result.cell.method, result.cell.defense.label())].append(result)
    undefended = {
        method: _spread([r.accuracy for r in runs if r.status == "completed"]).mean
        for (method, defense), runs in groups.items()
        if defense == "none"
    }
    rows = []
    for (method, defense), runs in groups.items():
        done = [r for r in runs if r.status == "completed"]
        accuracy = _spread([r.accuracy for r in done])
        base = undefended.get(method)
        change = None if base is None or accuracy.mean is None else (accuracy.mean - base) * 100
        names = sorted({name for r in done for name in r.label_leak})
        rows.append(
            PrivacyRow(
                method,
                defense,
                len(runs),
                len(runs) - len(done),
                accuracy,
                change,
                _spread([r.input_dcor for r in done]),
                _spread([r.reconstruction_gain for r in done]),
                _spread([r.surrogate_gain for r in done]),
                _spread([r.unsplit_gain for r in done]),
                done[0].sealed if done else None,
                _spread([r.reconstruction_mse for r in done]),
                _spread([r.baseline_mse for r in done]),
                _spread([r.ssim for r in done]),
                _spread([r.baseline_ssim for r in done]),
                {n: _spread([r.label_leak.get(n) for r in done]) for n in names},
                _spread([r.update_gain for r in done]),
                _spread([r.update_baseline for r in done]),
                _spread([r.geiping_gain for r in done]),
                done[0].exposed_weights if done else None,
                next((r.note for r in done if r.note), ""),
            )
        )
    return rows


def _text(spread: Spread, digits: int) -> str:
    """mean +- std, or the mean alone for one run (a std of one run says nothing)."""
    if spread.n == 1 and spread.mean is not None:
        return f"{spread.mean:.{digits}f}"
    return spread.text(digits)


def _leak_text(row: PrivacyRow) -> str:
    if "labels sent" in row.leaks:
        return "1.00 (labels sent)"
    parts = [f"{n} {_text(row.leaks[n], 2)}" for n in LABEL_ATTACKS if n in row.leaks]
    return "<br>".join(parts) or "not measured"


def _black_box_text(row: PrivacyRow) -> str:
    if row.surrogate.mean is None and row.unsplit.mean is None:
        return "-"
    return f"{_text(row.surrogate, 2)} / {_text(row.unsplit, 2)}"


def _reconstruction_text(row: PrivacyRow) -> str:
    if row.gain.mean is not None:
        return _text(row.gain, 2)
    parts = []
    if row.geiping.mean is not None:
        parts.append(f"gradient matching {row.geiping.mean:.2f}")
    if row.update_gain.mean is not None:
        parts.append(f"first layer {row.update_gain.mean:.2f}")
    if row.update_baseline.mean is not None:
        parts.append(f"(public records {row.update_baseline.mean:.2f})")
    return " ".join(parts) or row.note or "-"


def markdown(config: ExperimentConfig, rows: list[PrivacyRow]) -> str:
    settings = config.privacy_settings
    lines = [
        f"Dataset `{config.dataset}`, {', '.join(config.partitions)}, "
        f"{', '.join(map(str, config.sites))} sites, {config.rounds} rounds, seeds "
        f"{', '.join(map(str, config.seeds))}; attacks target site-01; the attacker's "
        f"auxiliary data is a held-out {settings.auxiliary_fraction:.0%} of the dataset that no "
        f"site holds; inversion decoder trained {settings.attack_epochs} epochs.",
        "",
        "| method | defense | accuracy | vs none (points) | input dCor² | reconstruction gain, "
        "black-box: shadow head / UnSplit | reconstruction gain, white-box (segments in "
        "plaintext) | MSE attack / mean guess | SSIM attack / mean guess | label leak AUC "
        "| weights the aggregator can read |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ssim = (
            f"{row.ssim.mean:.2f} / {row.baseline_ssim.mean:.2f}"
            if row.ssim.mean is not None and row.baseline_ssim.mean is not None
            else "-"
        )
        mse = (
            f"{row.mse.mean:.3f} / {row.baseline_mse.mean:.3f}"
            if row.mse.mean is not None and row.baseline_mse.mean is not None
            else "-"
        )
        change = "-" if row.change is None or row.defense == "none" else f"{row.change:+.2f}"
        failed = f" ({row.failed} failed)" if row.failed else ""
        exposed = "-" if row.exposed is None else f"{100 * row.exposed:.3g}%"
        if row.sealed:
            exposed = "none (sealed)"
        lines.append(
            f"| {row.method}{failed} | {row.defense} | {_text(row.accuracy, 3)} | {change} | "
            f"{_text(row.dcor, 2)} | {_black_box_text(row)} | {_reconstruction_text(row)} | "
            f"{mse} | {ssim} | {_leak_text(row)} | {exposed} |"
        )
    return "\n".join(lines) + "\n"


def plot(config: ExperimentConfig, rows: list[PrivacyRow], path: Path) -> Path:
    """Accuracy against reconstruction gain and against the strongest gradient attack."""
    fig, (recon, labels) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        if row.accuracy.mean is None:
            continue
        u_shaped = row.method.startswith("split-u")
        style = {
            "marker": "o" if u_shaped else "s",
            "color": "tab:blue" if u_shaped else "tab:orange",
        }
        if row.gain.mean is not None:
            recon.scatter(row.accuracy.mean, row.gain.mean, **style)
            recon.annotate(
                f"{row.method.split()[0]}: {row.defense}",
                (row.accuracy.mean, row.gain.mean),
                fontsize=7,
            )
        gradient = [row.leaks[n].mean for n in ("norm", "cosine") if n in row.leaks]
        present = [g for g in gradient if g is not None]
        if present:
            labels.scatter(row.accuracy.mean, max(present), **style)
            labels.annotate(row.defense, (row.accuracy.mean, max(present)), fontsize=7)
    recon.set(
        xlabel="held-out accuracy",
        ylabel="reconstruction gain over the mean guess",
        title=f"{config.dataset}: inputs from activations",
    )
    labels.set(
        xlabel="held-out accuracy",
        ylabel="label leak AUC (norm or cosine, the stronger)",
        title=f"{config.dataset}: split-u labels from gradients",
    )
    labels.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    recon.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_privacy(
    config: ExperimentConfig, results: list[Measured], *, command: str, docs: bool = False
) -> list[Path]:
    """privacy.md, privacy.json and privacy.png in the output directory; with ``docs``, the
    table and plot also into docs/privacy.md's section for the dataset."""
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results)
    table = markdown(config, rows)
    atomic_write(out / "privacy.md", f"# Privacy: {config.name}\n\n`{command}`\n\n{table}".encode())
    cells = [
        {**asdict(r), "cell": {**asdict(r.cell), "defense": r.cell.defense.model_dump()}}
        for r in results
    ]
    atomic_write(out / "privacy.json", json.dumps(cells, indent=2, default=str).encode())
    image = plot(config, rows, out / "privacy.png")
    written = [out / "privacy.md", out / "privacy.json", image]
    if docs:
        name = f"privacy-{config.dataset}.png"
        shutil.copyfile(image, IMAGES / name)
        body = f"`{command}`\n\n{table}\n![accuracy against leakage](img/{name})\n"
        doc_sections.write_section(DOC, config.dataset, body, header="# Privacy\n", tag="privacy")
        written += [DOC, IMAGES / name]
    return written
