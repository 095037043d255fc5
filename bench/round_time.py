"""Seconds per FedAvg/FLOP round through Mosquitto, and how much of it is network overhead.

    python bench/round_time.py [--write-docs] [--quick]

For 3 and 10 sites, each mode runs as a real job: the aggregator and one agent per site (threads
of this process, each with its own MQTT connection) through a Mosquitto started here, rounds of
one local epoch, median over rounds after a warm-up round. A round is the training phase as the
aggregator sees it: weights down, local training, weights up, averaging.

* Parallel rounds (how FedAvg runs): the headline seconds per round.
* Sequential rounds (the sites train one after the other) split that time cleanly: every site
  reports how long its own training took, and as only one site computes at a time,
  network overhead = round time - the sum of the sites' compute, measured in the same rounds.

Two models: the ``cnn`` on synthetic-cxr images (2.2 MB of weights) and the ``mlp`` on
breast-cancer (16 KB), so both the per-byte and the per-message costs show.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.config import JobConfig
from aggregator.state import RoundRecord
from bench._report import bench_main, machine
from edge_agent.data import datasets
from experiments.inprocess import run_job
from medsplit.brokers.mosquitto import Mosquitto
from medsplit.wiring import mqtt_connector

SETTINGS = (("synthetic-cxr", "cnn-cxr"), ("breast-cancer", "mlp-ehr"))


def rounds_of(
    port: int, dataset: str, plan: str, mode: str, *, orchestration: str, n_sites: int, rounds: int
) -> list[RoundRecord]:
    """The round records of one job, warm-up round dropped."""
    names = [f"site-{i:02d}" for i in range(n_sites)]
    job_id = f"bench-{mode}-{n_sites}-{uuid.uuid4().hex[:6]}"
    config = JobConfig.from_mapping(
        {
            "job_id": job_id,
            "plan": plan,
            "mode": mode,
            "orchestration": orchestration,
            "rounds": {"count": rounds + 1},
            "training": {"batch_size": 32},
            "sites": names,
            "dataset": dataset,
            "broker": {"url": f"mqtt://127.0.0.1:{port}", "insecure": True},
        }
    )
    shares = datasets.all_sites(datasets.load(dataset), n_sites, "iid", seed=0)

    connect = mqtt_connector(config.broker)
    result = run_job(config, dict(zip(names, shares, strict=True)), connect, timeout=1800)
    return result.history[1:]


def run(quick: bool) -> str:
    rounds = 2 if quick else 4
    lines = [
        "| model | mode | sites | parallel round | sequential round | sites' compute | network overhead | per site | KB up per site per round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp)) as broker:
        for dataset, plan in SETTINGS:
            for n_sites in (3, 10):
                for mode in ("fedavg", "flop"):
                    common = {"n_sites": n_sites, "rounds": rounds}
                    parallel = rounds_of(
                        broker.port, dataset, plan, mode, orchestration="parallel", **common
                    )
                    sequential = rounds_of(
                        broker.port, dataset, plan, mode, orchestration="sequential", **common
                    )
                    par = statistics.median(r.train_seconds for r in parallel)
                    seq = statistics.median(r.train_seconds for r in sequential)
                    compute = statistics.median(sum(r.compute_seconds.values()) for r in sequential)
                    overhead = seq - compute
                    up = statistics.median(r.bytes["site-00"]["up"] for r in parallel)
                    row = (
                        f"| {plan} | {mode} | {n_sites} | {par:.3f} s | {seq:.3f} s | {compute:.3f} s | "
                        f"{overhead:.3f} s ({overhead / seq:.0%}) | {1000 * overhead / n_sites:.1f} ms | {up / 1000:.1f} |"
                    )
                    print(row, flush=True)
                    lines.append(row)
    return "\n".join(lines)


def intro() -> str:
    return (
        "## Federated rounds: seconds per FedAvg/FLOP round through Mosquitto\n\n"
        "Command: `make bench` (runs `python bench/round_time.py --write-docs`).\n"
        f"Machine: {machine()}. Aggregator and agents are threads of one process, each with "
        "its own MQTT connection to a Mosquitto on loopback; one local epoch per round, batch "
        "32, IID shares. A round: the aggregator's training phase (weights down, local "
        "training, weights up, averaging), median over rounds after a warm-up. Parallel: "
        "how FedAvg runs. Sequential: the same job with one site training at a time, so that "
        "network overhead = round - the sum of the compute times the sites report for their "
        "own training, in the same rounds."
    )


if __name__ == "__main__":
    bench_main("round_time", __doc__, intro, run)
