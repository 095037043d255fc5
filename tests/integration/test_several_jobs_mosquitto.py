"""Ten studies on one real Mosquitto, provisioned from one federation.yaml: every hospital
takes part in three of them, with one kit (identity ``site@job``) and one agent per study.

A hospital's agent of one study reads and writes nothing of another (every "cannot" checked as
"never arrived", as in the site isolation tests), and the ten jobs, run at once, each end with
exactly the weights the same job ends with alone."""

from __future__ import annotations

import contextlib
import getpass
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from aggregator.config import JobConfig
from edge_agent.data import datasets
from edge_agent.data.datasets import SiteData
from experiments.inprocess import kit_connectors, run_job
from medsplit.brokers.mosquitto import Mosquitto, free_port
from medsplit.security.provision import Federation, Provisioner
from medsplit.transport import MqttTransport
from medsplit.transport.base import TransportError
from medsplit.transport.memory import MemoryBroker
from medsplit.wiring import memory_connector
from tests.integration.test_security_mosquitto import _client, _tls, _until
from tests.support.configs import job_config

pytestmark = pytest.mark.integration
HOSPITALS = [f"h{i}" for i in range(10)]
# Study i: hospitals i, i+1, i+2 (mod 10): every hospital is in three studies.
JOBS = {f"study-{i}": [HOSPITALS[(i + k) % 10] for k in range(3)] for i in range(10)}


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mosquitto]]:
    out = tmp_path_factory.mktemp("consortium") / "fed"
    port = free_port()
    spec = Federation.model_validate(
        {
            "jobs": {job: {"sites": sites} for job, sites in JOBS.items()},
            "broker_hosts": ["127.0.0.1"],
            "port": port,
            "bind_address": "127.0.0.1",
            "broker_user": getpass.getuser(),
        }
    )
    Provisioner.create(spec, out)
    broker = Mosquitto.provisioned(out / "mosquitto", port).start()
    yield out, broker
    broker.stop()


def _as(out: Path, broker: Mosquitto, party: str, job: str) -> MqttTransport:
    return _client(broker, _tls(out / job / party))


def test_a_hospitals_agent_of_one_study_reads_and_writes_nothing_of_another(
    consortium: tuple[Path, Mosquitto],
) -> None:
    out, broker = consortium
    mine, theirs = "study-0", "study-1"  # h1 and h2 are in both
    root, other = f"medsplit/v1/{mine}", f"medsplit/v1/{theirs}"
    h1, h1_there = _as(out, broker, "h1", mine), _as(out, broker, "h1", theirs)
    aggregator, aggregator_there = (_as(out, broker, "aggregator", j) for j in (mine, theirs))
    h1_there.subscribe(f"{other}/h1/down/+")
    aggregator_there.subscribe(f"{other}/+/up/+")
    for snoop in (f"{other}/h1/down/+", f"{other}/all/+", f"{other}/#", "#"):
        with contextlib.suppress(TransportError):  # granted, then every delivery is filtered
            h1.subscribe(snoop)
    with contextlib.suppress(TransportError):
        aggregator.subscribe(f"{other}/+/up/+")
    h1.subscribe(f"{root}/h1/down/+")
    aggregator.subscribe(f"{root}/+/up/+")

    # The other study's messages to h1 reach h1's agent of that study, never this one.
    aggregator_there.publish(f"{other}/h1/down/train", b"study-1 for h1")
    aggregator_there.publish(f"{other}/all/setup", b"study-1 broadcast")
    assert [m.payload for m in _until(h1_there, b"study-1 for h1")] == [b"study-1 for h1"]
    aggregator.publish(f"{root}/h1/down/train", b"study-0 for h1")
    assert [m.payload for m in _until(h1, b"study-0 for h1")] == [b"study-0 for h1"]

    # h1's kit of this study cannot speak in the other; the other's aggregator hears only h1's
    # own agent there, and this study's aggregator hears nothing of the other study.
    for forged in (f"{other}/h1/up/done", f"{other}/h1/presence", f"{other}/all/train"):
        with contextlib.suppress(TransportError):
            h1.publish(forged, b"forged from study-0")
    h1_there.publish(f"{other}/h1/up/done", b"h1's own done in study-1")
    got = _until(aggregator_there, b"h1's own done in study-1")
    assert [m.payload for m in got] == [b"h1's own done in study-1"]
    h1_there.publish(f"{other}/h1/up/stats", b"study-1 stats")
    h1.publish(f"{root}/h1/up/done", b"h1's done in study-0")
    assert [m.payload for m in _until(aggregator, b"h1's done in study-0")] == [
        b"h1's done in study-0"
    ]
    for transport in (h1, h1_there, aggregator, aggregator_there):
        transport.close()


def _config(job: str) -> JobConfig:
    return job_config(
        {
            "job_id": job,
            "plan": "mlp-ehr",
            "mode": "fedavg",
            "rounds": 2,
            "batch_size": 32,
            "seed": int(job.rsplit("-", 1)[1]),  # a different start per study
            "sites": JOBS[job],
            "round_deadline_s": 240,
            "join_deadline_s": 120,
        }
    )


def test_ten_studies_at_once_each_end_as_they_would_alone(
    consortium: tuple[Path, Mosquitto],
) -> None:
    out, _broker = consortium
    shares = datasets.all_sites(datasets.load("breast-cancer"), 10, "iid", seed=3)
    data = dict(zip(HOSPITALS, shares, strict=True))

    def together(job: str) -> dict[str, torch.Tensor]:
        config = _config(job)
        sites: dict[str, SiteData] = {s: data[s] for s in JOBS[job]}
        federation = Provisioner(out).federation
        connect_as = kit_connectors(out, federation, federation.study(job))
        result = run_job(
            config, sites, connect_as("aggregator"), connect_as=connect_as, timeout=300
        )
        assert set(result.history[-1].metrics) == set(JOBS[job])
        return result.final_model()

    with ThreadPoolExecutor(len(JOBS)) as pool:
        at_once = dict(zip(JOBS, pool.map(together, JOBS), strict=True))

    for job, members in JOBS.items():
        alone = run_job(
            _config(job),
            {s: data[s] for s in members},
            memory_connector(MemoryBroker()),
            timeout=300,
        ).final_model()
        assert alone.keys() == at_once[job].keys()
        for name, tensor in alone.items():
            assert torch.equal(tensor, at_once[job][name]), f"{job}: {name} differs"
    # And the studies really are different jobs (different seeds, different hospitals).
    first, second = at_once["study-0"], at_once["study-1"]
    assert any(not torch.equal(first[k], second[k]) for k in first)
