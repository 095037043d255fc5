"""A broker inside a hospital, bridged to the central broker: two real Mosquittos on loopback,
configured only by ``medsplit provision`` (mutual TLS at both ends, the generated bridge topics
and ACLs), and a relay on the bridge's one outbound connection that takes the WAN link down for
30 s in the middle of a job.

The bridged hospital's agent speaks only to its own broker. The job ends with exactly the
weights it ends with without any cut, and the hospital broker's own log (``-v``: every PUBLISH
it received) shows that no message of another hospital ever reached it.
"""

from __future__ import annotations

import contextlib
import getpass
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from edge_agent.data import datasets
from experiments.inprocess import kit_connectors, run_job
from experiments.relay import TcpProxy
from medsplit.brokers.mosquitto import Mosquitto, free_port
from medsplit.security.provision import Federation, Provisioner
from medsplit.transport.base import TransportError
from medsplit.transport.memory import MemoryBroker
from medsplit.wiring import memory_connector
from tests.integration.test_security_mosquitto import _client, _tls, _until
from tests.support.configs import job_config

pytestmark = pytest.mark.integration
JOB = "bridged"
SITES = ["h-a", "h-b", "h-c"]
BRIDGED = "h-a"
OUTAGE_S = 30.0  # the cut: longer than the bridge's keepalive and its reconnect backoff
PUBLISH = re.compile(r"Received PUBLISH from \S+ \([^']*'([^']+)'")


@dataclass
class Hospitals:
    out: Path
    central: Mosquitto
    hospital: Mosquitto
    relay: TcpProxy

    def topics_at_the_hospital(self) -> list[str]:
        return PUBLISH.findall(self.hospital.log_path.read_text(errors="replace"))


@pytest.fixture
def hospitals(tmp_path: Path) -> Iterator[Hospitals]:
    central_port, local_port = free_port(), free_port()
    relay = TcpProxy(central_port)
    me = getpass.getuser()
    spec = Federation.model_validate(
        {
            "job_id": JOB,
            "sites": SITES,
            "broker_hosts": ["127.0.0.1"],
            "port": central_port,
            "bind_address": "127.0.0.1",
            "broker_user": me,
            "hospital_brokers": {
                BRIDGED: {
                    "hosts": ["127.0.0.1"],
                    "port": local_port,
                    "bind_address": "127.0.0.1",
                    "remote": f"127.0.0.1:{relay.port}",
                    "broker_user": me,
                    "restart_max_s": 2,
                    "keepalive_s": 5,
                }
            },
        }
    )
    out = tmp_path / "fed"
    Provisioner.create(spec, out)
    central = Mosquitto.provisioned(out / "mosquitto", central_port).start()
    hospital = Mosquitto.provisioned(out / "bridges" / BRIDGED, local_port, verbose=True).start()
    try:
        yield Hospitals(out, central, hospital, relay)
    finally:
        hospital.stop()
        central.stop()
        relay.close()


def _config() -> dict[str, object]:
    return {
        "job_id": JOB,
        "plan": "mlp-ehr",
        "mode": "fedavg",
        "rounds": 6,
        "batch_size": 32,
        "seed": 7,
        "sites": SITES,
        "round_deadline_s": 180,  # far beyond the outage: the round waits for the hospital
        "join_deadline_s": 120,
    }


def _data() -> dict[str, datasets.SiteData]:
    shares = datasets.all_sites(datasets.load("breast-cancer"), 3, "iid", seed=2)
    return dict(zip(SITES, shares, strict=True))


def _cut_mid_job(hospitals: Hospitals, done: threading.Event) -> None:
    """Take the link down for OUTAGE_S the moment the hospital's agent has handed its broker
    its first round's update: mid-job (round 1 of 6), the update perhaps still to cross."""
    update = f"{JOB}/{BRIDGED}/up/done"
    while not any(t.endswith(update) for t in hospitals.topics_at_the_hospital()):
        if done.wait(0.01):  # polling the hospital broker's log, which grows with every PUBLISH
            return
    hospitals.relay.go_down()
    done.wait(OUTAGE_S)  # the outage itself: the duration is the scenario, not a wait for work
    hospitals.relay.come_up()


def test_a_bridged_hospital_rides_out_a_30_s_outage_with_the_same_weights(
    hospitals: Hospitals,
) -> None:
    federation = Provisioner(hospitals.out).federation
    connect_as = kit_connectors(hospitals.out, federation, federation.study(JOB))
    done = threading.Event()
    cutter = threading.Thread(target=_cut_mid_job, args=(hospitals, done), daemon=True)
    cutter.start()
    started = time.monotonic()
    try:
        result = run_job(
            job_config(_config()),
            _data(),
            connect_as("aggregator"),
            connect_as=connect_as,
            timeout=400,
        )
    finally:
        done.set()
        cutter.join()
    assert hospitals.relay.accepted >= 2, "the bridge did not connect again after the outage"
    assert time.monotonic() - started > OUTAGE_S  # the job really waited through the outage
    assert set(result.history[-1].metrics) == set(SITES)
    assert result.coordinator.late_messages == 0

    uncut = run_job(job_config(_config()), _data(), memory_connector(MemoryBroker()), timeout=300)
    expected, got = uncut.final_model(), result.final_model()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), f"{name} differs after the outage"

    seen = hospitals.topics_at_the_hospital()
    assert any(t.endswith(f"/{BRIDGED}/down/train") for t in seen)  # the log is the real one
    foreign = [t for t in seen if any(f"/{other}/" in t for other in SITES if other != BRIDGED)]
    assert foreign == []


def test_the_bridge_carries_nothing_of_another_hospital_either_way(hospitals: Hospitals) -> None:
    out, central, hospital = hospitals.out, hospitals.central, hospitals.hospital
    root = f"medsplit/v1/{JOB}"
    aggregator = _client(central, _tls(out / "aggregator"))
    aggregator.subscribe(f"{root}/+/up/+")
    local_a = _client(hospital, _tls(out / BRIDGED))
    local_a.subscribe(f"{root}/{BRIDGED}/down/+")
    for snoop in (f"{root}/h-b/down/+", f"{root}/#", "#"):
        with contextlib.suppress(TransportError):
            local_a.subscribe(snoop)
    # Another hospital's kit is refused at this hospital's broker: it has no block there.
    intruder = _client(hospital, _tls(out / "h-b"))
    with contextlib.suppress(TransportError):
        intruder.publish(f"{root}/h-b/up/done", b"h-b through h-a's broker")

    # Wait until the bridge is up: a message to h-a crosses it.
    aggregator.publish(f"{root}/h-b/down/train", b"for h-b only")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        aggregator.publish(f"{root}/{BRIDGED}/down/train", b"for h-a")
        message = local_a.receive(1)
        if message is not None:
            break
    else:
        pytest.fail("the bridge did not carry h-a's downlink within 30 s")
    assert message.payload == b"for h-a"

    # h-a's agent cannot use its broker to speak as h-b; its own uplink crosses.
    with contextlib.suppress(TransportError):
        local_a.publish(f"{root}/h-b/up/done", b"forged as h-b")
    local_a.publish(f"{root}/{BRIDGED}/up/done", b"h-a's done")
    assert [m.payload for m in _until(aggregator, b"h-a's done")] == [b"h-a's done"]
    assert not [t for t in hospitals.topics_at_the_hospital() if "/h-b/down/" in t]
    for transport in (aggregator, local_a, intruder):
        transport.close()
