"""Hostile sites in real jobs (in-memory broker): poisoned updates, inflated sample counts,
junk floods, and a site revoked in the middle of the job."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from aggregator.config import JobConfig
from edge_agent.agent import Agent
from edge_agent.data import datasets
from experiments.inprocess import JobResult, run_job
from medsplit.protocol import Kind, edge_keys, final_keys, topics
from medsplit.throttle import ERROR_REPLY_BURST
from medsplit.transport import MemoryBroker
from medsplit.wire import Decoder, Envelope
from medsplit.wiring import memory_connector
from tests.support.configs import job_config

SITES = [f"site-{c}" for c in "abcde"]
EVIL = "site-e"


def _config(**overrides: Any) -> JobConfig:
    base: dict[str, Any] = {
        "job_id": "hostile",
        "plan": "mlp-ehr",
        "mode": "fedavg",
        "rounds": 3,
        "batch_size": 16,
        "optimizer": {"name": "adam", "lr": 0.01},
        "seed": 3,
        "sites": SITES,
        "round_deadline_s": 60,
        "join_deadline_s": 60,
    }
    base.update(overrides)
    return job_config(base)


def _data() -> dict[str, datasets.SiteData]:
    shares = datasets.all_sites(datasets.load("breast-cancer"), len(SITES), "iid", seed=0)
    return dict(zip(SITES, shares, strict=True))


class PoisoningAgent(Agent):
    """Site e sends noise instead of its trained weights (honest sample count)."""

    def _publish(
        self, envelope: Envelope, cast: set[str] | None = None, *, wait: bool = True
    ) -> None:
        if self.site_id == EVIL and envelope.kind == Kind.DONE:
            noise = torch.Generator().manual_seed(envelope.round)
            tensors = {
                k: torch.randn(v.shape, generator=noise) * 10 if v.is_floating_point() else v
                for k, v in envelope.tensors.items()
            }
            envelope = replace(envelope, tensors=tensors)
        super()._publish(envelope, cast, wait=wait)


class InflatingAgent(Agent):
    """Site e claims a thousand times its samples, to outweigh everyone."""

    def _publish(
        self, envelope: Envelope, cast: set[str] | None = None, *, wait: bool = True
    ) -> None:
        if self.site_id == EVIL and envelope.kind == Kind.DONE:
            envelope = replace(envelope, meta={**envelope.meta, "samples": 10**6})
        super()._publish(envelope, cast, wait=wait)


def _accuracy(result: JobResult) -> float:
    accuracy = result.history[-1].mean()["accuracy"]
    assert accuracy is not None
    return accuracy


def test_the_default_aggregation_bounds_one_poisoned_site_among_five() -> None:
    def accuracy(agent_type: type[Agent] = Agent, **aggregation: Any) -> float:
        config = _config(rounds=8, aggregation=aggregation)  # long enough to converge
        return _accuracy(
            run_job(config, _data(), memory_connector(MemoryBroker()), agent_type=agent_type)
        )

    plain = {"method": "mean", "median_norm_clip": None}
    poisoned = accuracy(PoisoningAgent, **plain)
    assert poisoned < accuracy(**plain) - 0.05, poisoned  # the attack is real with the plain mean
    for aggregation in ({}, {"clip_norm": 5.0, "median_norm_clip": None}):
        clean, attacked = accuracy(**aggregation), accuracy(PoisoningAgent, **aggregation)
        assert attacked >= clean - 0.02, (aggregation, clean, attacked)


def test_a_site_claiming_more_samples_than_it_declared_is_refused_every_round() -> None:
    result = run_job(
        _config(min_sites=4), _data(), memory_connector(MemoryBroker()), agent_type=InflatingAgent
    )
    for record in result.history:
        assert EVIL not in record.trained and EVIL in record.missed
        assert sorted(record.trained) == SITES[:4]


def test_a_junk_flood_is_counted_and_answered_only_a_few_times() -> None:
    broker = MemoryBroker()
    connect = memory_connector(broker)
    flood = 2_000

    def junk() -> None:
        rogue = connect("rogue")
        rogue.connect()
        for i in range(flood):
            rogue.publish(topics.up("hostile", "site-a", "done"), b"JUNK%d" % i)

    config = _config(mode="split-u", plan="mlp-ehr-u", orchestration="sequential", rounds=2)
    result = run_job(config, _data(), connect, before_run=junk)
    stats = result.coordinator.endpoint.stats
    assert stats.rejected["BadMagic"] == flood
    assert stats.rejected_from["medsplit/v1/hostile/site-a/up"] == flood
    errors_to_a = [
        t for c, t, _ in broker.published if t == topics.down("hostile", "site-a", Kind.ERROR)
    ]
    seconds = sum(r.seconds for r in result.history) + 10
    assert 1 <= len(errors_to_a) <= ERROR_REPLY_BURST * (seconds // 10 + 1)
    assert result.coordinator.error_replies.suppressed["site-a"] == flood - len(errors_to_a)
    assert len(result.history) == 2  # and the job finished for everyone


class RevokedMidJob(Agent):
    """Site e's certificate is revoked while it evaluates round 1 (its update of round 1 was
    already aggregated: evaluation starts only once the training turn closed); its process
    goes on."""

    revocations: Path

    def _publish(
        self, envelope: Envelope, cast: set[str] | None = None, *, wait: bool = True
    ) -> None:
        if self.site_id == EVIL and envelope.kind == Kind.METRICS and envelope.round == 0:
            self.revocations.write_text(json.dumps({"identities": [EVIL]}))
        super()._publish(envelope, cast, wait=wait)


def test_the_aggregator_refuses_a_revoked_site_before_the_broker_does(tmp_path: Path) -> None:
    revocations = tmp_path / "revocations.json"
    revocations.write_text(json.dumps({"identities": []}))
    RevokedMidJob.revocations = revocations
    broker = MemoryBroker()
    config = _config(
        min_sites=4, security={"revocations_file": str(revocations), "check_interval_s": 0.01}
    )
    result = run_job(config, _data(), memory_connector(broker), agent_type=RevokedMidJob)
    assert result.coordinator.sites[EVIL].revoked
    assert EVIL in result.history[0].trained
    assert all(EVIL not in record.trained for record in result.history[1:])
    finish_to_evil = [
        t for _, t, _ in broker.published if t == topics.down("hostile", EVIL, Kind.FINISH)
    ]
    assert finish_to_evil == []  # it never gets the final model


def test_a_site_revoked_before_the_job_is_never_let_in(tmp_path: Path) -> None:
    revocations = tmp_path / "revocations.json"
    revocations.write_text(json.dumps({"identities": [EVIL]}))
    broker = MemoryBroker()
    config = _config(min_sites=4, rounds=1, security={"revocations_file": str(revocations)})
    result = run_job(config, _data(), memory_connector(broker))
    assert result.coordinator.endpoint.stats.rejected["Revoked"] >= 1  # its hello, at least
    assert not result.coordinator.sites[EVIL].joined
    to_evil = [
        t
        for client, t, _ in broker.published
        if client.startswith("aggregator") and t.startswith(f"medsplit/v1/hostile/{EVIL}/")
    ]
    assert to_evil == []  # not even a setup


def test_finish_goes_only_to_its_own_site_and_carries_only_what_that_site_may_have() -> None:
    for mode, plan in [("flop", "mlp-ehr"), ("split-u", "mlp-ehr-u")]:
        config = _config(mode=mode, plan=plan, rounds=1, sites=SITES[:3])
        broker = MemoryBroker()
        run_job(config, dict(list(_data().items())[:3]), memory_connector(broker))
        decoder = Decoder(dedup_window=10**6)
        finishes: dict[str, set[str]] = {}
        for client, topic, payload in broker.published:
            if not client.startswith("aggregator") or topics.is_presence(topic):
                continue
            envelope = decoder.feed(payload)
            if envelope is not None and envelope.kind == Kind.FINISH:
                route = topics.parse(topic)
                assert route.direction == "down", topic  # never on the broadcast
                finishes[str(route.site)] = set(envelope.tensors)
        allowed = set(final_keys(config.plan, config.mode, config.release_trunk))
        if mode == "split-u":  # sealed: the sites' own layers travel only inside the seals
            allowed = (allowed - set(edge_keys(config.plan))) | {"seals"}
        assert finishes == dict.fromkeys(SITES[:3], allowed), mode
        if mode == "flop":  # the site's private layers never travel, not even back to it
            assert not set(allowed) & config.plan.private_keys
