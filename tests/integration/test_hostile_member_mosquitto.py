"""A hospital turned hostile, with its own valid certificate, against real processes over a
real Mosquitto with mutual TLS (the broker, ACL and kits of `medsplit provision`).

hospital-2 is played by ``Twin``: it holds hospital-2's real certificate, joins, and answers the
aggregator's requests with mistyped metadata, weights scaled by -50 or replaced by noise, and a
billion samples; it floods hellos from made-up agent processes, starts messages it never
finishes, sends kinds the job does not use, leaves retained messages and oversized packets.
hospital-1 and hospital-3 are honest agents. The aggregator must stay up, complete the job with
the honest sites' accuracy intact, count every refusal, send hospital-2 no more than a small
bound, and give back the memory the unfinished messages took.
"""

from __future__ import annotations

import math
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch

from aggregator.conduct import HELLO_BURST, HELLO_INTERVAL_S
from aggregator.config import JobConfig
from aggregator.coordinator import REQUEST_KINDS
from aggregator.requests import max_sends
from edge_agent.data import datasets
from experiments.federation import Federation, small_job
from experiments.inprocess import run_job
from medsplit.brokers.embedded import LocalBroker, start_local_broker
from medsplit.brokers.mosquitto import free_port
from medsplit.protocol import Kind, topics
from medsplit.transport import MemoryBroker, MqttSettings, MqttTransport, TlsSettings
from medsplit.transport.base import TransportError
from medsplit.wire import Envelope
from medsplit.wiring import memory_connector
from tests.support.metrics import Samples, parse_samples
from tests.support.twin import Twin, abandon_messages, noise, scaled

pytestmark = pytest.mark.integration
SITES = ["hospital-1", "hospital-2", "hospital-3"]
HOSTILE = "hospital-2"
ROUNDS = 5
MB = 1024 * 1024


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[tuple[Federation, LocalBroker, int]]:
    job = {**small_job("fedavg", "parallel", rounds=ROUNDS, deadline_s=120), "sites": SITES}
    http = free_port()
    job |= {"http": {"port": http}, "waits": {"status_interval_s": 2, "retry_interval_s": 1,
            "reassembly_timeout_s": 3}}  # fmt: skip
    with ExitStack() as stack:
        broker = start_local_broker(stack, provision=(tmp_path / "pki", job["job_id"], SITES))
        assert broker.kits is not None, "these tests need Mosquitto (scripts/setup.sh)"
        (tmp_path / "fed").mkdir()
        fed = Federation(tmp_path / "fed", broker.url, job, kits=broker)
        try:
            yield fed, broker, http
        finally:
            fed.stop_all()


def _metrics(port: int) -> Samples:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return parse_samples(response.read().decode())


def _rejected(port: int, reason: str) -> float:
    return _metrics(port).get("medsplit_messages_rejected_total", {}).get((("reason", reason),), 0)


def _until(what: str, check: Callable[[], bool], fed: Federation, timeout: float = 90) -> None:
    """Poll ``check`` (the aggregator's /metrics) until it holds; the aggregator must live."""
    deadline = time.monotonic() + timeout
    while not check():
        assert fed.processes["aggregator"].poll() is None, fed.tail("aggregator")
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(0.2)


def _hostile_answer(twin: Twin, flood: list[float]) -> Callable[[Envelope], Envelope | None]:
    """hospital-2's answers, round by round; a hello flood in the middle of round 2, whose
    duration goes into ``flood``."""

    def answer(request: Envelope) -> Envelope | None:
        r, kind = request.round, request.kind
        if kind == Kind.STATS_REQUEST:
            sums = {"sum": torch.zeros(30, dtype=torch.float64)}
            sums["sum_sq"] = torch.full((30,), 150.0, dtype=torch.float64)
            return request.reply(HOSTILE, Kind.STATS, tensors=sums, meta={"count": 150})
        if kind == Kind.TRAIN:
            if r == 2 and not flood:  # once (a re-issued request comes again)
                started = time.monotonic()
                for i in range(1_000):
                    twin.hello(f"fake{i}")
                flood.append(time.monotonic() - started)
            meta = {"samples": 150, "train_loss": 0.5, "train_seconds": 0.1}
            weights = dict(request.tensors)
            tampered = {
                0: (scaled(weights, -50), meta),
                1: (weights, {**meta, "train_loss": "nan"}),
                2: (weights, {**meta, "samples": 10**9}),
                3: (noise(weights, 10.0), meta),
            }.get(r, (scaled(weights, -50), meta))
            return request.reply(HOSTILE, Kind.DONE, tensors=tampered[0], meta=tampered[1])
        if kind == Kind.EVALUATE:
            meta = {"loss": 0.5, "accuracy": 0.5, "auroc": 0.5, "samples": 40}
            meta |= {"bytes_up": "x" if r == 0 else 1000, "bytes_down": 1000}
            return request.reply(HOSTILE, Kind.METRICS, meta=meta)
        if kind == Kind.FINISH:
            return request.reply(HOSTILE, Kind.FINISHED)
        return None

    return answer


def _retained_left(broker: LocalBroker, port: int, job: str) -> list[str]:
    """Topics under the sites' uplinks on which the broker still retains a message: a fresh
    subscriber (the aggregator's identity) collects what arrives before a sentinel."""
    assert broker.kits is not None
    kit = broker.kits / "aggregator"
    checker = MqttTransport(
        MqttSettings(
            host="127.0.0.1",
            port=port,
            client_id="retained-check",
            tls=TlsSettings(
                ca_file=kit / "ca.pem", cert_file=kit / "cert.pem", key_file=kit / "key.pem"
            ),
            connect_timeout_s=10,
        )
    )
    checker.subscribe(f"{topics.PREFIX}/{job}/+/up/+")
    checker.connect()
    try:
        sentinel = topics.up(job, "hospital-1", Kind.ERROR)
        checker.publish(sentinel, b"sentinel")
        left = []
        while (inbound := checker.receive(10)) is not None and inbound.payload != b"sentinel":
            if inbound.retained and inbound.payload:
                left.append(inbound.topic)
        assert inbound is not None, "the sentinel never came back"
        return left
    finally:
        checker.close()


def test_a_hostile_hospital_cannot_crash_stall_poison_or_bloat_the_job(
    federation: tuple[Federation, LocalBroker, int],
) -> None:
    fed, broker, http = federation
    port = int(broker.url.rsplit(":", 1)[1])
    assert broker.kits is not None
    aggregator = fed.start("aggregator")
    fed.start("hospital-1")
    _until("the aggregator's /metrics", lambda: _served(http), fed)
    twin = Twin(broker.kits, port, fed.job_id, HOSTILE)
    try:
        before, peak, after = abandon_messages(
            twin,
            aggregator.pid,
            lambda: _until("16 timeouts", lambda: _rejected(http, "ReassemblyTimeout") == 16, fed),
        )
        assert peak > before + 100, (before, peak)  # the attack really buffered
        assert after < before + 50, (before, peak, after)  # and it was all given back

        for _ in range(2_000):  # a kind a federated job never uses
            twin.send(twin.envelope(Kind.ACTIVATIONS))
        kinds = [Kind.HELLO, Kind.STATS, Kind.DONE, Kind.METRICS, Kind.ERROR]
        for i in range(20):  # parked on the broker: the aggregator refuses and deletes them
            twin.publish_raw(kinds[i % len(kinds)], b"\0" * 400_000, retain=True)
        _until("2,000 unexpected kinds", lambda: _rejected(http, "UnexpectedKind") == 2_000, fed)
        _until("20 retained messages", lambda: _rejected(http, "RetainedMessage") >= 20, fed)

        twin.hello("twin-0")
        fed.start("hospital-3")
        flood: list[float] = []
        serving = threading.Thread(
            target=twin.serve,
            args=(_hostile_answer(twin, flood), lambda: aggregator.poll() is not None),
        )
        serving.start()
        assert fed.wait("aggregator", 300) == 0, fed.tail("aggregator")
        serving.join(30)
        for site in ("hospital-1", "hospital-3"):
            assert fed.wait(site, 60) == 0, fed.tail(site)

        with pytest.raises(TransportError, match="disconnected"):  # by max_packet_size
            twin.publish_raw(Kind.STATS, b"\0" * 2 * MB)
    finally:
        twin.close()

    report = fed.report()
    assert report["status"] == "completed" and len(report["history"]) == ROUNDS
    # Poisoned weights did not get through: the honest sites do as well as in the same job
    # with an honest hospital-2 (within 5 points, about two of their 76 test records).
    clean = _clean_accuracy(fed.job_yaml)
    assert _honest_accuracy(report["history"][-1]["sites"]) >= clean - 0.05, report["history"]
    faults = report["faults"]
    assert faults["rejected"]["BadMeta"] == 2  # round 0's metrics, round 1's done
    assert faults["refused"]["BadMeta"] == 2
    assert faults["refused"]["ClaimsTooManySamples"] >= 1
    assert faults["refused_from"] == {HOSTILE: sum(faults["refused"].values())}
    assert faults["rejected"]["RateLimited"] >= 990
    assert faults["rejected"]["ReassemblyTimeout"] == 16
    assert _retained_left(broker, port, fed.job_id) == []
    # No amplification: for its thousand hellos hospital-2 got three setups per 10 s (the
    # honest hospital-1 got at least one).
    honest, hostile = report["wire_bytes"]["hospital-1"], report["wire_bytes"][HOSTILE]
    windows = 1 + math.ceil(flood[0] / HELLO_INTERVAL_S)
    answered = 1 + HELLO_BURST * windows
    assert hostile["down"]["setup"] <= answered * honest["down"]["setup"], (flood, hostile)
    # Re-issued train requests went out on the schedule of repeats (retry interval 1 s).
    extra = (hostile["down"]["train"] - honest["down"]["train"]) / (
        honest["down"]["train"] / ROUNDS
    )
    assert extra < max_sends(flood[0] + 1, 1.0), (flood, extra)
    control = sum(n for kind, n in hostile["down"].items() if kind not in REQUEST_KINDS)
    assert control < hostile["up"]["hello"] / 10, report["wire_bytes"]  # setups, errors


def _honest_accuracy(final: dict[str, Any]) -> float:
    """hospital-1's and hospital-3's accuracy, pooled over their test records."""
    honest = [final[site] for site in SITES if site != HOSTILE]
    return sum(m["accuracy"] * m["samples"] for m in honest) / sum(m["samples"] for m in honest)


def _clean_accuracy(job_yaml: Path) -> float:
    """The same job with an honest hospital-2, in this process over the in-memory broker."""
    config = JobConfig.from_yaml(job_yaml)
    shares = datasets.all_sites(datasets.load("breast-cancer"), len(SITES), "iid", seed=0)
    result = run_job(
        config, dict(zip(SITES, shares, strict=True)), memory_connector(MemoryBroker())
    )
    return _honest_accuracy(result.history[-1].metrics)


def _served(http: int) -> bool:
    try:
        _metrics(http)
    except OSError:
        return False
    return True
