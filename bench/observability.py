"""What watching a job costs: rounds while the aggregator is scraped, and each answer's price.

    python bench/observability.py [--write-docs] [--quick]

1. **A scraped job.** The same split-u job (2 sites, breast-cancer, real processes through a
   Mosquitto started here) runs unwatched and while a client asks the aggregator's `/status`,
   `/metrics` and `/` ten times a second -- ten times what the status page asks, 150 times a
   Prometheus scrape every 15 s. Runs alternate (at least 3 pairs); the figure is the job's
   summed round seconds from report.json (joining and start-up excluded), as the median and
   range of the watched/unwatched ratio.
2. **One answer for a long job.** `/status` and `/metrics` are computed from the job's state when
   asked; for 10 sites and 1,000 closed rounds, the median time to build each, in this process.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry, generate_latest

from aggregator.observability import JobCollector, StepTimes, status
from aggregator.state import JobState, Phase, RoundRecord, SiteEntry
from bench._report import bench_main, machine
from experiments.federation import Federation, small_job
from medsplit.brokers.mosquitto import Mosquitto, free_port
from medsplit.channel import EndpointStats

ROUNDS = 20
PATHS = ("/status", "/metrics", "/")


class Watcher(threading.Thread):
    """Asks the aggregator's pages at ``hz`` until stopped; keeps each answer's latency."""

    def __init__(self, base: str, hz: float) -> None:
        super().__init__(daemon=True)
        self.base, self.period = base, 1 / hz
        self.latency: dict[str, list[float]] = {path: [] for path in PATHS}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.period):
            for path in PATHS:
                started = time.perf_counter()
                try:
                    with urllib.request.urlopen(self.base + path, timeout=5) as answer:  # noqa: S310
                        answer.read()
                except OSError:
                    continue  # not serving yet, or already gone
                self.latency[path].append(time.perf_counter() - started)


def job_seconds(workdir: Path, broker: Mosquitto, *, watched: bool) -> tuple[float, Watcher | None]:
    """Summed round seconds of one job, and the watcher that asked meanwhile (if any)."""
    port = free_port()
    job = {**small_job("split-u", "parallel", rounds=ROUNDS), "http": {"port": port}}
    workdir.mkdir()
    fed = Federation(workdir, broker.url, job)
    watcher = Watcher(f"http://127.0.0.1:{port}", hz=10) if watched else None
    try:
        fed.start_all()
        if watcher is not None:
            watcher.start()
        codes = fed.wait_all(600)
        assert set(codes.values()) == {0}, "\n".join(fed.tail(n) for n in codes)
    finally:
        if watcher is not None:
            watcher.done.set()
            watcher.join(10)
        fed.stop_all()
    report = fed.report()
    return sum(r["seconds"] for r in report["history"]), watcher


def long_job(sites: int = 10, rounds: int = 1000) -> Any:
    """A stand-in coordinator holding the state of a job of ``sites`` x ``rounds``."""
    names = [f"hospital-{i:02d}" for i in range(sites)]
    entries = {s: SiteEntry(s, joined=True, connected=True, train_samples=500) for s in names}
    metrics = {s: {"loss": 0.3, "accuracy": 0.9, "auroc": 0.95, "samples": 100} for s in names}
    history = tuple(
        RoundRecord(r, metrics=metrics, train_loss=dict.fromkeys(names, 0.3), seconds=2.0)
        for r in range(rounds)
    )
    state = JobState(Phase.TRAINING, entries, {}, deadline=1e9, round=rounds, history=history)
    state = replace(state, asked=tuple(names), record=RoundRecord(rounds), round_started=0.0)
    config = SimpleNamespace(
        job_id="long",
        mode="split-u",
        orchestration="parallel",
        rounds=SimpleNamespace(count=rounds + 10, deadline_s=600.0),
    )
    steps = StepTimes()
    for s in names:
        for i in range(100):
            steps.step.observe(s, 0.03 + i * 1e-4)
    return SimpleNamespace(
        state=state,
        config=config,
        clock=time.monotonic,
        endpoint=SimpleNamespace(stats=EndpointStats()),
        step_times=steps,
        last_checkpoint=None,
    )


def answer_ms(repeats: int) -> tuple[float, float]:
    coordinator = long_job()
    registry = CollectorRegistry()
    registry.register(JobCollector(lambda: cast(Any, coordinator)))

    def median_ms(call: Any) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        return 1000 * statistics.median(times)

    return median_ms(lambda: status(coordinator)), median_ms(lambda: generate_latest(registry))


def run(quick: bool) -> str:
    pairs = 1 if quick else 3
    ratios, watchers = [], []
    plain_s, watched_s = [], []
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        for pair in range(pairs):
            order = (False, True) if pair % 2 == 0 else (True, False)
            seconds = {}
            for watched in order:
                name = f"{'watched' if watched else 'plain'}-{pair}"
                seconds[watched], watcher = job_seconds(Path(tmp) / name, broker, watched=watched)
                if watcher is not None:
                    watchers.append(watcher)
            plain_s.append(seconds[False])
            watched_s.append(seconds[True])
            ratios.append(seconds[True] / seconds[False])
            print(f"pair {pair}: unwatched {seconds[False]:.2f} s, watched {seconds[True]:.2f} s")
    latency = {p: [x for w in watchers for x in w.latency[p]] for p in PATHS}
    status_ms, metrics_ms = answer_ms(20 if quick else 100)
    lines = [
        "| measure | value |",
        "|---|---|",
        f"| split-u job, {ROUNDS} rounds: summed round seconds unwatched (median of {pairs}) | "
        f"{statistics.median(plain_s):.2f} s |",
        f"| the same, watched at 10 Hz (median) | {statistics.median(watched_s):.2f} s |",
        f"| **watched / unwatched**, median (range) over {pairs} interleaved pairs | "
        f"**{statistics.median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f}) |",
    ]
    for path in PATHS:
        if latency[path]:
            lines.append(
                f"| `{path}` answer during the job, median over {len(latency[path])} | "
                f"{1000 * statistics.median(latency[path]):.1f} ms |"
            )
    lines += [
        f"| `/status` built for 10 sites x 1,000 closed rounds | {status_ms:.1f} ms |",
        f"| `/metrics` built for the same job | {metrics_ms:.1f} ms |",
    ]
    return "\n".join(lines)


def intro() -> str:
    return (
        "## Observability: what watching a job costs\n\n"
        "Command: `make bench` (runs `python bench/observability.py --write-docs`).\n"
        f"Machine: {machine()}. The aggregator and two agents are processes through a Mosquitto "
        "on loopback; the watcher asks `/status`, `/metrics` and `/` ten times a second for "
        "the whole job. Round seconds are the job's own (report.json), so start-up and joining "
        "do not count. The last two rows build the answers in-process for a long job."
    )


if __name__ == "__main__":
    bench_main("observability", __doc__, intro, run)
