"""Vertical split learning through a real Mosquitto with mutual TLS and the provisioned ACL:
every party on its own certificate, the aggregator on its own. The job ends bit for bit where
centralized training on the joined table ends, and the alignment's messages -- as each
identity could read them off the broker -- hold no identifier, no salted key of a patient
outside the intersection, and, for the aggregator, no salted key at all."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from edge_agent.alignment import common_key, open_common
from edge_agent.data.vertical import DEMO_KEY_SECRET
from experiments.inprocess import run_job
from experiments.vertical import builtin_tables, centralized, joined, party_names
from medsplit.brokers.embedded import LocalBroker, start_local_broker
from medsplit.config import BrokerConfig
from medsplit.ids import AGGREGATOR_ID
from medsplit.protocol import Kind, topics
from medsplit.wire import Decoder, Envelope
from medsplit.wiring import Connector, mqtt_connector
from tests.component.test_vertical import vertical_config
from tests.support.twin import Listener

pytestmark = pytest.mark.integration
JOB = "job-vertical"
PARTIES = party_names(3)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    with ExitStack() as stack:
        local = start_local_broker(stack, provision=(tmp_path / "pki", JOB, PARTIES))
        assert local.kits is not None, "this test needs Mosquitto (scripts/setup.sh)"
        yield local


def _connect_as(local: LocalBroker) -> dict[str, Connector]:
    return {
        identity: mqtt_connector(
            BrokerConfig.model_validate(local.broker_section(identity)), identity, JOB
        )
        for identity in [AGGREGATOR_ID, *PARTIES]
    }


@pytest.mark.parametrize(
    ("count", "merge", "u_shaped"),
    [(2, "concat", True), (2, "mean", False), (3, "sum", True), (3, "concat", False)],
)
def test_vertical_jobs_over_mosquitto_end_like_centralized_training(
    broker: LocalBroker, count: int, merge: str, u_shaped: bool
) -> None:
    parties = party_names(count)
    config = vertical_config(parties, job_id=JOB, merge=merge, u_shaped=u_shaped)
    connectors = _connect_as(broker)
    result = run_job(
        config,
        builtin_tables(parties, coverage=0.85, seed=4),
        connectors[AGGREGATOR_ID],
        connect_as=connectors.__getitem__,
        timeout=180,
    )
    data = {party: agent.data for party, agent in result.agents.items()}
    expected = centralized(config, joined(data, parties))
    got = dict(result.coordinator.final_state())
    for agent in result.agents.values():
        assert agent.segments is not None and agent.endpoint.stats.rejected == {}
        got |= agent.segments.state()
    assert {key: torch.equal(got[key], value) for key, value in expected.items()} == dict.fromkeys(
        expected, True
    )


def _envelopes(frames: list[tuple[str, bytes]]) -> list[tuple[str, Envelope]]:
    decoder = Decoder(dedup_window=10**6)
    return [
        (topic, envelope)
        for topic, payload in frames
        if (envelope := decoder.feed(payload)) is not None
    ]


def test_the_alignment_tells_no_identity_of_a_patient_outside_the_intersection(
    broker: LocalBroker,
) -> None:
    assert broker.kits is not None
    port = int(broker.url.rsplit(":", 1)[1])
    listeners = {
        AGGREGATOR_ID: Listener(
            broker.kits, port, AGGREGATOR_ID, topics.aggregator_subscriptions(JOB)
        )
    } | {
        party: Listener(broker.kits, port, party, topics.site_subscriptions(JOB, party))
        for party in PARTIES
    }
    tables = builtin_tables(PARTIES, coverage=0.7, seed=5)
    config = vertical_config(PARTIES, job_id=JOB, rounds=1)
    connectors = _connect_as(broker)
    try:
        run_job(config, tables, connectors[AGGREGATOR_ID], connect_as=connectors.__getitem__)
    finally:
        frames = {identity: listener.close() for identity, listener in listeners.items()}

    salted = {party: set(table.salted(JOB)) for party, table in tables.items()}
    common = set.intersection(*salted.values())
    outside = set.union(*salted.values()) - common
    assert common and outside
    assert all(key.startswith("breast-cancer-") for t in tables.values() for key in t.keys)
    hidden = [bytes.fromhex(key) for key in outside] + [key.encode() for key in outside]
    shared = [bytes.fromhex(key) for key in common] + [key.encode() for key in common]
    sealing = common_key(DEMO_KEY_SECRET, JOB)
    told: dict[str, set[str]] = {}
    for identity, seen in frames.items():
        assert seen, identity
        for _, payload in seen:  # every byte this identity could read off the broker
            assert b"breast-cancer-" not in payload
            assert not any(key in payload for key in hidden)
            if identity == AGGREGATOR_ID:  # not even the common patients' salted keys
                assert not any(key in payload for key in shared)
        for _, envelope in _envelopes(seen):
            blob = (
                envelope.tensors["common"].numpy().tobytes() if envelope.kind == Kind.ALIGN else b""
            )
            if blob and identity != AGGREGATOR_ID:
                keys = open_common(sealing, blob)
                told[identity] = {keys[i : i + 32].hex() for i in range(0, len(keys), 32)}
    assert told == dict.fromkeys(PARTIES[1:], common)  # the others learn the intersection only
    sizes = [
        envelope.meta.get("size")
        for _, envelope in _envelopes(frames[AGGREGATOR_ID])
        if envelope.kind == Kind.ALIGNED and envelope.meta.get("size") is not None
    ]
    assert sizes[-1] == len(common)  # the aggregator learns the intersection's size
