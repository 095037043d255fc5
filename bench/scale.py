"""What grows with the number of sites: real processes for 5 to 50 hospitals, and the in-process
simulation for 50 to 200.

    python bench/scale.py [--write-docs] [--quick]

**Processes.** ``medsplit demo`` runs Mosquitto with mutual TLS, the aggregator and one agent
process per hospital, as a deployment does; a sampler thread reads every process's CPU time and
resident memory with psutil five times a second. Per round (rounds after the first, whose
joining and warm-up differ): the wall time and the bytes per site from report.json; for the
whole job (start-up included: about 1.3 s of imports): the aggregator's and the broker's CPU
seconds, the aggregator's peak RSS and the agents' median RSS. Site counts whose agents would not fit in this machine's available memory (measured per
agent at the smaller counts) are reported as what they would need instead of being run.

**Simulation.** The experiment runner (every party a thread of one process, over a real
Mosquitto) for 50, 100 and 200 sites on ``flchain-death`` (7,679 records: 30 or more a site).

Each table ends with the fitted growth: a least-squares fit of ``a + b*N + c*N^2`` to the
per-round wall time, with what the quadratic term adds at the largest count; per-site cost is
flat when that share is small.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import bench_main, machine
from experiments.config import ExperimentConfig
from experiments.runner import run_cell, run_grid

PROCESS_MODES = (("fedavg", "parallel"), ("split-u", "sequential"), ("split-u", "parallel"))


@dataclass
class Sampled:
    """The newest CPU time and the peak RSS of each process, by role."""

    cpu: dict[int, float] = field(default_factory=dict)
    rss: dict[int, int] = field(default_factory=dict)
    role: dict[int, str] = field(default_factory=dict)

    def sample(self, root: psutil.Process) -> None:
        for child in root.children(recursive=True):
            try:
                line = " ".join(child.cmdline())
                times = child.cpu_times()
                rss = child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.role[child.pid] = _role(line)
            self.cpu[child.pid] = times.user + times.system
            self.rss[child.pid] = max(rss, self.rss.get(child.pid, 0))

    def of(self, role: str) -> list[int]:
        return [pid for pid, r in self.role.items() if r == role]


def _role(command_line: str) -> str:
    if "mosquitto" in command_line and " -c " in command_line:
        return "broker"
    if " aggregator " in f"{command_line} ":
        return "aggregator"
    if " agent " in f"{command_line} ":
        return "agent"
    return "other"


def run_processes(sites: int, mode: str, orchestration: str, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "medsplit", "demo", "--sites", str(sites), "--mode",
                   mode, "--orchestration", orchestration, "--rounds", str(rounds),
                   "--out", str(out), "--timeout", "1800"]  # fmt: skip
        demo = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        sampled, done = Sampled(), threading.Event()

        def sampler() -> None:
            root = psutil.Process(demo.pid)
            while not done.is_set():
                sampled.sample(root)
                done.wait(0.2)  # five samples a second: the processes' own clocks keep the sums

        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        _, err = demo.communicate()
        done.set()
        thread.join()
        if demo.returncode != 0:
            raise RuntimeError(f"demo with {sites} sites failed: {err.decode()[-2000:]}")
        report = json.loads((out / "report.json").read_text())
    later = report["history"][1:] or report["history"]
    per_round = statistics.fmean(h["seconds"] for h in later)
    traffic = [sum(t["up"] + t["down"] for t in h["bytes"].values()) for h in later]
    return {
        "sites": sites,
        "round_s": per_round,
        "mb_per_site": statistics.fmean(traffic) / sites / 1e6,
        "aggregator_cpu": sum(sampled.cpu[p] for p in sampled.of("aggregator")),
        "broker_cpu": sum(sampled.cpu[p] for p in sampled.of("broker")),
        "aggregator_mb": max((sampled.rss[p] for p in sampled.of("aggregator")), default=0) / 2**20,
        "agent_mb": statistics.median([sampled.rss[p] for p in sampled.of("agent")]) / 2**20,
    }


def run_simulation(sites: int, rounds: int) -> dict[str, Any]:
    config = ExperimentConfig.model_validate(
        {"name": f"scale-{sites}", "dataset": "flchain-death", "modes": ["fedavg"],
         "sites": [sites], "seeds": [0], "rounds": rounds, "batch_size": 32}
    )  # fmt: skip
    started = time.perf_counter()
    (result,) = run_grid(config, config.cells(), lambda c, u, p: run_cell(config, c, u, p))
    if result.status != "completed":
        raise RuntimeError(f"simulation with {sites} sites failed: {result.error}")
    later = result.history[1:] or result.history
    return {
        "sites": sites,
        "round_s": statistics.fmean(r.seconds for r in later),
        "wall_s": time.perf_counter() - started,
        "mb_per_site": (result.bytes_per_site("up") + result.bytes_per_site("down")) / 1e6,
    }


def growth(rows: list[dict[str, Any]]) -> str:
    """``a + b*N + c*N^2`` fitted to the round time; the quadratic term's share at the largest N."""
    n = np.array([r["sites"] for r in rows], dtype=float)
    t = np.array([r["round_s"] for r in rows])
    if len(n) < 3:
        return "too few points to fit"
    c, b, a = np.polyfit(n, t, 2)
    top = n.max()
    share = c * top * top / (a + b * top + c * top * top)
    per_site = [r["round_s"] / r["sites"] for r in rows]
    return (
        f"fit: {a:.3g} s + {b * 1e3:.3g} ms x N + {c * 1e3:.3g} ms x N^2; the N^2 term is "
        f"{100 * share:.0f} % of the round at N = {top:.0f}; seconds per site per round "
        f"{per_site[0]:.3g} at N = {rows[0]['sites']} and {per_site[-1]:.3g} at N = {rows[-1]['sites']} "
        f"({per_site[-1] / per_site[0]:.2f}x)"
    )


def run(quick: bool) -> str:
    counts = (3, 5, 8) if quick else (5, 10, 25, 50)
    rounds = 2 if quick else 3
    available = psutil.virtual_memory().available
    lines = []
    for mode, orchestration in PROCESS_MODES[:1] if quick else PROCESS_MODES:
        lines += [
            f"**{mode}, {orchestration} rounds, real processes**",
            "",
            "| sites | round s | MB per site per round | aggregator CPU s (whole job) | broker CPU s (whole job) | aggregator peak MB | agent median MB |",
            "|---|---|---|---|---|---|---|",
        ]
        rows: list[dict[str, Any]] = []
        for sites in counts:
            agent_mb = rows[-1]["agent_mb"] if rows else 0.0
            needed = sites * agent_mb * 2**20
            if needed > 0.85 * available:
                lines.append(
                    f"| {sites} | not run: {sites} agents of {agent_mb:.0f} MB need "
                    f"{needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available | | | | | |"
                )
                continue
            row = run_processes(sites, mode, orchestration, rounds)
            rows.append(row)
            lines.append(
                f"| {sites} | {row['round_s']:.2f} | {row['mb_per_site']:.3f} | "
                f"{row['aggregator_cpu']:.2f} | {row['broker_cpu']:.2f} | "
                f"{row['aggregator_mb']:.0f} | {row['agent_mb']:.0f} |"
            )
            print(lines[-1], flush=True)
        lines += ["", growth(rows), ""]
    simulated = [
        run_simulation(n, 2 if quick else 3) for n in ((20, 40, 60) if quick else (50, 100, 200))
    ]
    lines += [
        "**fedavg, simulated (one process, every party a thread, a real Mosquitto)**",
        "",
        "| sites | round s | MB per site (whole job) | job wall s |",
        "|---|---|---|---|",
        *(
            f"| {r['sites']} | {r['round_s']:.2f} | {r['mb_per_site']:.3f} | {r['wall_s']:.1f} |"
            for r in simulated
        ),
        "",
        growth(simulated),
    ]
    return "\n".join(lines)


def intro() -> str:
    return (
        "## Scale: what grows with the number of sites\n\n"
        "Command: `python bench/scale.py --write-docs`.\n"
        f"Machine: {machine()}. Real processes: `medsplit demo` (Mosquitto with mutual TLS, "
        "the aggregator, one agent process per hospital, breast-cancer shares), sampled with "
        "psutil; per round means rounds after the first. Simulated: the experiment runner on "
        "`flchain-death`."
    )


if __name__ == "__main__":
    bench_main("scale", __doc__, intro, run)
