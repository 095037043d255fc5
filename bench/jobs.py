"""How many studies one broker carries: 1 to 40 three-site fedavg jobs at once on one Mosquitto.

    python bench/jobs.py [--write-docs] [--quick]

N is 1, 5, 10, 20 and 40 (160 parties, 160 TLS connections).

One federation.yaml with N jobs (job i: hospitals i, i+1, i+2 of N, so every hospital is in
three), provisioned as a deployment would be; the broker is the Mosquitto it configures (mutual
TLS, the generated ACL), and every party of every job connects with its own kit
(``site@job``). The jobs run at once in one process (each job's aggregator and agents are
threads, as in the experiment runner), so what grows is what the broker and the machine carry,
not N copies of PyTorch. Per row: the wall time until every job ended, against one job alone in
the same run; the broker's CPU seconds (psutil); the bytes the jobs' sites sent and received through it.
"""

from __future__ import annotations

import getpass
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.config import JobConfig
from bench._report import bench_main, machine
from edge_agent.data import datasets
from experiments.inprocess import kit_connectors, run_job
from medsplit.brokers.mosquitto import Mosquitto, free_port
from medsplit.security.provision import Federation, Provisioner

ROUNDS = 5


def consortium(jobs: int, hospitals: int) -> dict[str, list[str]]:
    """Job i: hospitals i, i+1, i+2 (mod the number of hospitals)."""
    names = [f"h{i}" for i in range(hospitals)]
    return {f"study-{i}": [names[(i + k) % hospitals] for k in range(3)] for i in range(jobs)}


def run_jobs(count: int, rounds: int) -> dict[str, Any]:
    hospitals = max(count, 3)
    jobs = consortium(count, hospitals)
    shares = datasets.all_sites(datasets.load("breast-cancer"), hospitals, "iid", seed=3)
    data = dict(zip([f"h{i}" for i in range(hospitals)], shares, strict=True))
    with tempfile.TemporaryDirectory() as tmp:
        out, port = Path(tmp) / "fed", free_port()
        spec = Federation.model_validate(
            {"jobs": {j: {"sites": s} for j, s in jobs.items()}, "broker_hosts": ["127.0.0.1"],
             "port": port, "bind_address": "127.0.0.1", "broker_user": getpass.getuser()}
        )  # fmt: skip
        federation = Provisioner.create(spec, out).federation
        broker = Mosquitto.provisioned(out / "mosquitto", port).start()
        try:
            process = psutil.Process(broker.process.pid)  # type: ignore[union-attr]

            def one(job: str) -> int:
                config = JobConfig.from_mapping(
                    {"job_id": job, "plan": "mlp-ehr", "mode": "fedavg", "sites": jobs[job],
                     "rounds": {"count": rounds, "deadline_s": 600, "join_deadline_s": 300},
                     "training": {"batch_size": 32}},
                    job,
                )  # fmt: skip
                connect_as = kit_connectors(out, federation, federation.study(job))
                result = run_job(
                    config,
                    {s: data[s] for s in jobs[job]},
                    connect_as("aggregator"),
                    connect_as=connect_as,
                    timeout=900,
                )
                return sum(s.bytes_up + s.bytes_down for s in result.coordinator.sites.values())

            started = time.perf_counter()
            with ThreadPoolExecutor(count) as pool:
                traffic = sum(pool.map(one, jobs))
            wall = time.perf_counter() - started
            cpu = process.cpu_times()
        finally:
            broker.stop()
    return {"jobs": count, "wall_s": wall, "broker_cpu": cpu.user + cpu.system,
            "mb": traffic / 1e6}  # fmt: skip


def run(quick: bool) -> str:
    counts = (1, 2, 4) if quick else (1, 5, 10, 20, 40)
    rounds = 2 if quick else ROUNDS
    run_jobs(1, 1)  # warm-up: imports and first kernels are not the broker's cost
    rows = []
    for count in counts:
        rows.append(run_jobs(count, rounds))
        print(rows[-1], flush=True)
    alone = rows[0]["wall_s"]
    lines = [
        f"**N three-site fedavg jobs at once on one Mosquitto, {rounds} rounds each**",
        "",
        "| jobs | parties | wall s (all jobs) | x one job alone | per job, x alone | broker CPU s | MB through the broker |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['jobs']} | {4 * r['jobs']} | {r['wall_s']:.1f} | {r['wall_s'] / alone:.2f} | "
            f"{r['wall_s'] / alone / r['jobs']:.2f} | {r['broker_cpu']:.2f} | {r['mb']:.1f} |"
            for r in rows
        ),
    ]
    return "\n".join(lines)


def intro() -> str:
    return (
        "## Several jobs on one broker\n\n"
        "Command: `python bench/jobs.py --write-docs`.\n"
        f"Machine: {machine()}. One federation.yaml with N jobs, its Mosquitto (mutual TLS, "
        "the generated ACL), every party with its own kit; the jobs' parties are threads of one "
        "process. 'x one job alone' is against the first row, measured in the same run."
    )


if __name__ == "__main__":
    bench_main("jobs", __doc__, intro, run)
