"""Sealed segments in real jobs (in-memory broker): the aggregator relays the sites' head and
tail without ever holding them, the sealed job ends exactly where the unsealed one does, and a
seal that is not what it claims is refused while the job goes on."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from aggregator.config import JobConfig
from aggregator.coordinator import JobFailed
from aggregator.sealed_relay import as_bytes, relayed_senders
from edge_agent.agent import Agent
from edge_agent.data import datasets
from edge_agent.sealing import to_tensor
from experiments.inprocess import JobResult, run_job
from medsplit.privacy.accounting import gaussian_epsilon
from medsplit.protocol import Kind
from medsplit.protocol.spec import SEAL, SEALS
from medsplit.security.seal import read_header, unbundle
from medsplit.transport import MemoryBroker
from medsplit.wire import Envelope
from medsplit.wiring import memory_connector
from tests.support.configs import job_config

SITES = ["site-a", "site-b", "site-c"]


def _config(**overrides: Any) -> JobConfig:
    base: dict[str, Any] = {
        "job_id": "sealed",
        "plan": "mlp-ehr-u",
        "mode": "split-u",
        "orchestration": "sequential",
        "rounds": 2,
        "batch_size": 32,
        "optimizer": {"name": "adam", "lr": 0.01},
        "seed": 5,
        "sites": SITES,
        "round_deadline_s": 60,
        "join_deadline_s": 60,
    }
    base.update(overrides)
    return job_config(base)


def _data() -> dict[str, datasets.SiteData]:
    shares = datasets.all_sites(datasets.load("breast-cancer"), len(SITES), "iid", seed=0)
    return dict(zip(SITES, shares, strict=True))


class Recording(Agent):
    """Keeps every head/tail state it hands on, to look for it on the wire afterwards."""

    handed_on: ClassVar[list[dict[str, torch.Tensor]]] = []

    def _outgoing(self, env: Envelope) -> dict[str, torch.Tensor]:
        assert self.segments is not None
        Recording.handed_on.append({k: v.clone() for k, v in self.segments.state().items()})
        return super()._outgoing(env)


def _windows(tensor: torch.Tensor, size: int = 32) -> list[bytes]:
    """A few byte windows of a tensor as float32 and as float16 (what could travel)."""
    out = []
    for dtype in (torch.float32, torch.float16):
        raw = tensor.detach().to(dtype).contiguous().flatten().numpy().tobytes()
        if len(raw) >= size:
            out += [raw[i : i + size] for i in range(0, min(len(raw) - size, 4 * size), size)]
    return out


@pytest.mark.parametrize("orchestration", ["sequential", "parallel"])
def test_no_head_or_tail_tensor_can_be_read_off_the_broker(orchestration: str) -> None:
    Recording.handed_on = []
    broker = MemoryBroker()
    result = run_job(
        _config(orchestration=orchestration),
        _data(),
        memory_connector(broker),
        agent_type=Recording,
    )
    assert Recording.handed_on  # every turn handed weights on
    secrets = [w for state in Recording.handed_on for t in state.values() for w in _windows(t)]
    payloads = [payload for _, _, payload in broker.published]
    for window in secrets:
        assert not any(window in payload for payload in payloads)
    # The aggregator holds the last turn's seals, nothing of the segments.
    held = result.coordinator.final_state()
    assert SEALS in held and not any(k.startswith(("hidden1", "classifier")) for k in held)
    expected = SITES if orchestration == "parallel" else [SITES[-1]]
    assert relayed_senders(held) == expected


@pytest.mark.parametrize("orchestration", ["sequential", "parallel"])
def test_sealed_and_unsealed_jobs_end_with_the_same_weights(orchestration: str) -> None:
    runs: dict[bool, JobResult] = {}
    for sealed in (True, False):
        # Compared bit for bit: without split-u's default gradient noise, which is secret
        # randomness that no two runs share.
        config = _config(
            orchestration=orchestration, seal_segments=sealed, defenses={"gradient_noise": 0}
        )
        runs[sealed] = run_job(config, _data(), memory_connector(MemoryBroker()))
    for site in SITES:  # what sealing carries: every site's head and tail, bit for bit
        sealed_layers = runs[True].agents[site].segments.state()  # type: ignore[union-attr]
        plain_layers = runs[False].agents[site].segments.state()  # type: ignore[union-attr]
        assert sealed_layers.keys() == plain_layers.keys()
        for key in sealed_layers:
            assert torch.equal(sealed_layers[key], plain_layers[key]), (site, key)
    losses = [[r.metrics[s]["loss"] for s in SITES] for r in runs[True].history]
    assert losses == [[r.metrics[s]["loss"] for s in SITES] for r in runs[False].history]


class Tampering(Agent):
    """site-b's seal of round 0 has one byte flipped on its way out."""

    def _outgoing(self, env: Envelope) -> dict[str, torch.Tensor]:
        out = super()._outgoing(env)
        if self.site_id == "site-b" and env.round == 0:
            data = bytearray(as_bytes(out[SEAL]))
            data[-5] ^= 0x01
            out[SEAL] = to_tensor(bytes(data))
        return out


class Misplacing(Agent):
    """site-b seals its round-1 turn as if it were another round's."""

    def _outgoing(self, env: Envelope) -> dict[str, torch.Tensor]:
        if self.site_id != "site-b" or env.round != 1:
            return super()._outgoing(env)
        assert self.sealing is not None and self.spec is not None and self.segments is not None
        seal = self.sealing.seal_state(
            self.segments.state(),
            self.spec,
            round=0,
            turn=int(env.meta.get("turn") or 0),
            samples=self.data.train_samples,
            recipients=SITES,
        )
        return {SEAL: seal}


@pytest.mark.parametrize(
    ("agent_type", "round", "reason"),
    [(Tampering, 0, "does not verify"), (Misplacing, 1, "answers round 1 turn 1")],
)
def test_a_bad_seal_is_refused_with_its_reason_and_the_job_goes_on(
    agent_type: type[Agent], round: int, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="aggregator.coordinator"):
        result = run_job(
            _config(), _data(), memory_connector(MemoryBroker()), agent_type=agent_type
        )
    assert len(result.history) == 2  # the job went on and finished
    record = result.history[round]
    assert "site-b" in record.missed and "site-b" not in record.trained
    assert {"site-a", "site-c"} <= set(record.trained)
    conduct = result.coordinator.conduct
    assert conduct.refusals["BadSeal"] == 1 and conduct.refused_from["site-b"] == 1
    lines = [r.getMessage() for r in caplog.records if "refused site-b" in r.getMessage()]
    assert len(lines) == 1 and "BadSeal" in lines[0] and reason in lines[0]
    # Everyone still ends with the same head and tail: the turn went on from the last good seal.
    states = [result.agents[s].segments.state() for s in SITES]  # type: ignore[union-attr]
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])


class RevokedMidJob(Agent):
    """site-c's certificate is revoked while it evaluates round 0."""

    revocations: ClassVar[Path]

    def _publish(
        self, envelope: Envelope, cast: set[str] | None = None, *, wait: bool = True
    ) -> None:
        if self.site_id == "site-c" and envelope.kind == Kind.METRICS and envelope.round == 0:
            self.revocations.write_text(json.dumps({"identities": ["site-c"]}))
        super()._publish(envelope, cast, wait=wait)


def test_a_revoked_site_is_left_out_of_every_later_seal(tmp_path: Path) -> None:
    revocations = tmp_path / "revocations.json"
    revocations.write_text(json.dumps({"identities": []}))
    RevokedMidJob.revocations = revocations
    config = _config(
        rounds=3,
        min_sites=2,
        security={"revocations_file": str(revocations), "check_interval_s": 0.01},
    )
    result = run_job(config, _data(), memory_connector(MemoryBroker()), agent_type=RevokedMidJob)
    assert result.coordinator.sites["site-c"].revoked
    seals = unbundle(as_bytes(result.coordinator.final_state()[SEALS]))
    headers = [read_header(blob) for blob in seals]
    assert headers and all("site-c" not in h.recipients for h in headers)
    assert all(h.round == 2 for h in headers)


def _private(budget: float, rounds: int) -> JobConfig:
    return _config(
        sites=SITES[:2],
        rounds=rounds,
        defenses={"activation_noise": 2.0, "activation_clip": 3.0, "epsilon_budget": budget},
    )


def test_each_site_reports_its_epsilon_every_round() -> None:
    budget = gaussian_epsilon(2.0, 2, 1e-5) + 1e-6  # exactly two rounds of one epoch
    result = run_job(
        _private(budget, 2), dict(list(_data().items())[:2]), memory_connector(MemoryBroker())
    )
    for record, epochs in zip(result.history, (1, 2), strict=True):
        for site in SITES[:2]:
            assert record.metrics[site]["epsilon"] == pytest.approx(
                gaussian_epsilon(2.0, epochs, 1e-5)
            )


def test_a_site_at_its_budget_trains_no_more_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = gaussian_epsilon(2.0, 1, 1e-5) + 1e-6  # one round's worth
    with (
        caplog.at_level(logging.WARNING, logger="edge_agent.agent"),
        pytest.raises(JobFailed, match="round 1: only 0 sites trained"),
    ):
        run_job(
            _private(budget, 3), dict(list(_data().items())[:2]), memory_connector(MemoryBroker())
        )
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "edge_agent.agent" and "epsilon budget reached" in r.getMessage()
    ]
    assert {line.split(":")[0] for line in lines} == set(SITES[:2])
