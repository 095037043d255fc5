"""A junk flood during a real job: how much longer the job takes, and what the sites got back.

One site of a split-u job (2 sites, breast-cancer, through Mosquitto on loopback) -- or anyone
able to publish on its uplink -- sends a burst of junk frames when the job starts. Before the
fixes of the security issue the aggregator answered every frame with an error envelope (10,267
sent for a 10,000-frame burst), logged a line for each, and the job took 2.3x as long. Now
replies and log lines are throttled per sender, the inbox serves senders in turn and drops
what one sender queues beyond its share, and every rejection is counted.

A clean job, a flooded one, and a flooded one with replies and log lines unthrottled (the
behaviour before, as the baseline measured in the same run) are interleaved; the table gives
medians and the range of each ratio to the clean job, and the error envelopes sent back.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from _report import bench_main, machine

from aggregator import coordinator
from aggregator.config import JobConfig
from edge_agent.data import datasets
from experiments.inprocess import JobResult, run_job
from medsplit import channel
from medsplit.brokers.mosquitto import Mosquitto
from medsplit.protocol import Kind, topics
from medsplit.throttle import Throttle
from medsplit.transport import MqttSettings, MqttTransport
from medsplit.wiring import mqtt_connector

FLOOD = 10_000


def _job(port: int, flood: int) -> tuple[float, JobResult, int]:
    """One job's wall time, its result, and how many error envelopes site-a got."""
    job_id = f"flood-{uuid.uuid4().hex[:6]}"
    config: JobConfig = JobConfig.from_mapping(
        {
            "job_id": job_id,
            "plan": "mlp-ehr-u",
            "mode": "split-u",
            "orchestration": "sequential",
            "rounds": {"count": 3},
            "training": {"batch_size": 32},
            "sites": ["site-a", "site-b"],
            "broker": {"url": f"mqtt://127.0.0.1:{port}", "insecure": True},
        }
    )
    shares = datasets.all_sites(datasets.load("breast-cancer"), 2, "iid", seed=0)
    listener = MqttTransport(MqttSettings(host="127.0.0.1", port=port, client_id=f"count-{job_id}"))
    listener.subscribe(topics.down(job_id, "site-a", Kind.ERROR))
    listener.connect()

    rogue = MqttTransport(MqttSettings(host="127.0.0.1", port=port, client_id="rogue"))
    rogue.connect()

    def junk() -> None:  # while the job joins and trains
        rogue.publish_all(
            topics.up(job_id, "site-a", "done"), [b"JUNK%d" % i for i in range(flood)]
        )

    flooding = threading.Thread(target=junk, daemon=True)
    started = time.perf_counter()
    result = run_job(
        config,
        dict(zip(config.sites, shares, strict=True)),
        mqtt_connector(config.broker),
        before_run=flooding.start if flood else None,
    )
    seconds = time.perf_counter() - started
    if flood:
        flooding.join()
    rogue.close()
    errors = 0
    while listener.receive(0.5) is not None:
        errors += 1
    listener.close()
    return seconds, result, errors


@contextlib.contextmanager
def _unthrottled() -> Iterator[None]:
    """The behaviour before the security issue, for the baseline: every bad frame answered
    with an error envelope and logged."""
    saved = coordinator.error_replies, channel.LOG_BURST
    coordinator.error_replies = lambda clock=time.monotonic: Throttle(10**9, 1.0, clock)
    channel.LOG_BURST = 10**9
    try:
        yield
    finally:
        coordinator.error_replies, channel.LOG_BURST = saved


def run(quick: bool) -> str:
    triples = 2 if quick else 3
    clean, throttled, unthrottled = [], [], []
    sent_back: dict[str, list[int]] = {"throttled": [], "unthrottled": []}
    counted = []
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp)) as broker:
        _job(broker.port, 0)  # warm-up
        for _ in range(triples):
            clean.append(_job(broker.port, 0)[0])
            seconds, result, errors = _job(broker.port, FLOOD)
            throttled.append(seconds)
            sent_back["throttled"].append(errors)
            transport = result.coordinator.endpoint.transport
            counted.append(
                result.coordinator.endpoint.stats.rejected["BadMagic"]
                + sum(transport.throttled.values())
            )
            with _unthrottled():
                seconds, _, errors = _job(broker.port, FLOOD)
            unthrottled.append(seconds)
            sent_back["unthrottled"].append(errors)
            print(
                f"clean {clean[-1]:.2f} s, flooded {throttled[-1]:.2f} s, "
                f"flooded unthrottled {unthrottled[-1]:.2f} s",
                flush=True,
            )
    base = statistics.median(clean)

    def row(name: str, times: list[float], errors: str) -> str:
        ratios = [t / c for t, c in zip(times, clean, strict=True)]
        return (
            f"| {name} | {statistics.median(times):.2f} s | +{statistics.median(times) - base:.2f} s | "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {errors} |"
        )

    return "\n".join(
        [
            "| job | wall time (median) | extra | / clean (median, range) | error envelopes back |",
            "| --- | --- | --- | --- | --- |",
            f"| clean | {base:.2f} s | | 1.00x | 0 |",
            row(
                "flooded, replies and logs unthrottled (as before)",
                unthrottled,
                f"{max(sent_back['unthrottled']):,}",
            ),
            row("flooded, as now", throttled, f"{max(sent_back['throttled'])}"),
            "",
            f"{triples} interleaved triples; of the {FLOOD:,} junk frames the report counted "
            f"{min(counted):,} as rejected or throttled. The extra time that remains is the "
            "network reading the flood: it arrives on the aggregator's one connection ahead "
            "of the sites' messages.",
        ]
    )


def intro() -> str:
    return (
        "## A junk flood during a job\n\n"
        "`python bench/flood.py --write-docs` "
        f"({machine()}). A split-u job of 2 sites, 3 rounds, through Mosquitto on loopback; at "
        f"the start a client publishes {FLOOD:,} junk frames on site-a's uplink while the job "
        "joins and trains; job time is the whole job's wall time. Before the security issue: "
        "2.3x the job time and 10,267 error envelopes back."
    )


if __name__ == "__main__":
    bench_main("flood", __doc__, intro, run)
