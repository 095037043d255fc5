"""Seconds per FedAvg/FLOP round through Mosquitto, and how much of it is network overhead.

    python bench/round_time.py [--write-docs] [--quick]

For 3 and 10 sites, each mode runs a real job: the aggregator and one agent per site (threads
of this process, each with its own MQTT connection) through a Mosquitto started here, parallel
rounds of one local epoch. The round time is the training phase of a round as the aggregator
sees it (weights down, local training, weights up, averaging), median over rounds after a
warm-up round. The local compute is the same sites' one-epoch local training measured in the
same run without any network, one site after the other; network overhead = round time minus
local compute. Two models: the ``cnn`` on synthetic-cxr images (2.2 MB of weights) and the
``mlp`` on breast-cancer (16 KB), so both the per-byte and the per-message costs show.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import machine, write_section
from experiments.inprocess import run_job
from medsplit import datasets
from medsplit.broker import Mosquitto
from medsplit.config import JobConfig
from medsplit.datasets import SiteData
from medsplit.training import make_optimizer, train_epochs
from medsplit.transport import MqttSettings, MqttTransport

SETTINGS = (("synthetic-cxr", "cnn-cxr"), ("breast-cancer", "mlp-ehr"))


def local_compute_seconds(config: JobConfig, sites: dict[str, SiteData], repeats: int) -> float:
    """One local epoch on every site, one after the other, no network: median over repeats."""
    times = []
    for repeat in range(repeats + 1):  # the first pass warms up
        started = time.perf_counter()
        for data in sites.values():
            model = config.plan.model.build(seed=config.seed)
            optimizer = make_optimizer(model.parameters(), config.optimizer)
            train_epochs(
                model,
                optimizer,
                data.x_train,
                data.y_train,
                epochs=1,
                batch_size=config.batch_size,
                seed=config.seed,
                first_epoch=repeat,
            )
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def round_seconds(
    port: int, dataset: str, plan: str, mode: str, *, n_sites: int, rounds: int
) -> tuple[float, float, int]:
    """Median training-phase seconds per round, local compute, and bytes up per site per round."""
    names = [f"site-{i:02d}" for i in range(n_sites)]
    job_id = f"bench-{mode}-{n_sites}-{uuid.uuid4().hex[:6]}"
    config = JobConfig.from_mapping(
        {
            "job_id": job_id,
            "plan": plan,
            "mode": mode,
            "rounds": rounds + 1,
            "batch_size": 32,
            "sites": names,
            "dataset": dataset,
        }
    )
    shares = datasets.all_sites(datasets.load(dataset), n_sites, "iid", seed=0)
    sites = dict(zip(names, shares, strict=True))

    def transport(client: str) -> MqttTransport:
        return MqttTransport(MqttSettings(port=port, client_id=f"{job_id}-{client}"))

    result = run_job(config, sites, transport, timeout=1800)
    history = result.history[1:]  # round 0 warms up
    per_round = statistics.median(r.train_seconds for r in history)
    up = statistics.median(r.bytes[names[0]]["up"] for r in history)
    return per_round, local_compute_seconds(config, sites, rounds), int(up)


def run(quick: bool) -> str:
    rounds = 2 if quick else 4
    lines = [
        "| model | mode | sites | seconds per round | local compute | network overhead | overhead per site | KB up per site per round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp)) as broker:
        for dataset, plan in SETTINGS:
            for n_sites in (3, 10):
                for mode in ("fedavg", "flop"):
                    total, compute, up = round_seconds(
                        broker.port, dataset, plan, mode, n_sites=n_sites, rounds=rounds
                    )
                    overhead = total - compute
                    row = (
                        f"| {plan} | {mode} | {n_sites} | {total:.3f} | {compute:.3f} | "
                        f"{overhead:.3f} ({overhead / total:.0%}) | {1000 * overhead / n_sites:.1f} ms | {up / 1000:.1f} |"
                    )
                    print(row, flush=True)
                    lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    table = run(args.quick)
    print()
    print(table)
    if args.write_docs:
        write_section(
            "round_time",
            "## Federated rounds: seconds per FedAvg/FLOP round through Mosquitto\n\n"
            "Command: `make bench` (runs `python bench/round_time.py --write-docs`).\n"
            f"Machine: {machine()}. Aggregator and agents are threads of one process, each with "
            "its own MQTT connection to a Mosquitto on loopback; parallel rounds, one local epoch, "
            "batch 32, IID shares. Seconds per round: the aggregator's training phase (weights "
            "down, local training, weights up, averaging), median over rounds after a warm-up. "
            "Local compute: the same sites' local epoch without network, one after the other, "
            "measured in the same run. Overhead = round - local compute.\n\n"
            f"{table}\n",
        )


if __name__ == "__main__":
    main()
