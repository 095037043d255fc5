"""Faults injected into real processes over a real Mosquitto: what a federation survives.

Every test runs ``medsplit aggregator`` and ``medsplit agent`` as child processes
(``tests.support.federation``), kills or stops one of them -- or the broker -- at a point the
test observes (a checkpoint file appearing, a log line), and checks the job still completes,
that the report says what happened, and that the outcome matches an uninterrupted run. Round
deadlines are long (10 minutes) and the process timeouts short: a job that completes did not
wait out a deadline.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from experiments.federation import Federation, small_job
from experiments.vertical import column_widths, party_names, table_plan
from medsplit.brokers.mosquitto import Mosquitto

LONG = 600  # round deadline: never reached by a job that recovers as it should
TIMEOUT = 240  # seconds for a job to complete


def _job(mode: str, orchestration: str, **settings: Any) -> dict[str, Any]:
    job = small_job(mode, orchestration, deadline_s=LONG, **settings)
    if mode == "split-u":  # two federations compared bit for bit: no secret gradient noise
        job["defenses"] = {"gradient_noise": 0}
    return job


def _federation(
    tmp_path: Path, name: str, broker: Mosquitto, job: dict[str, Any], **kw: Any
) -> Federation:
    workdir = tmp_path / name
    workdir.mkdir()
    return Federation(workdir, broker.url, job, **kw)


def _completed(fed: Federation) -> dict[str, Any]:
    codes = fed.wait_all(TIMEOUT)
    failed = [name for name, code in codes.items() if code != 0]
    assert not failed, "\n".join(fed.tail(name) for name in failed)
    report = fed.report()
    assert report["status"] == "completed"
    return report


def _unsealed(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if k != "seals"}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@dataclass(frozen=True)
class _Outcome:
    """What an uninterrupted run of a job ended with: its report, global and site tensors."""

    report: dict[str, Any]
    weights: dict[str, torch.Tensor]
    site_weights: dict[str, dict[str, torch.Tensor]]

    @classmethod
    def of(cls, fed: Federation, report: dict[str, Any]) -> _Outcome:
        return cls(report, fed.weights(), {s: fed.site_weights(s) for s in fed.sites})


# Uninterrupted runs by job (its id aside: the outcome does not depend on it), so tests that
# inject different faults into the same job compare against one clean run.
_CLEAN: dict[str, _Outcome] = {}


def _against_clean(
    tmp_path: Path,
    broker: Mosquitto,
    job: dict[str, Any],
    fault: Callable[[Federation], None],
    *,
    faulty_broker: Mosquitto | None = None,
    **kw: Any,
) -> tuple[Federation, dict[str, Any], dict[str, Any]]:
    """The job with ``fault`` injected (on ``faulty_broker`` if given), next to an uninterrupted
    run of the same job (run alongside, the first time this job is seen); both must end with
    the same tensors, the global ones and every site's own (bit for bit): nothing was lost or
    applied twice. Returns the faulty federation, its report and the clean one's."""
    key = json.dumps({k: v for k, v in job.items() if k != "job_id"}, sort_keys=True)
    clean = None if key in _CLEAN else _federation(tmp_path, "clean", broker, job, **kw)
    faulty_job = {**job, "job_id": f"{job['job_id']}-f"}
    faulty = _federation(tmp_path, "faulty", faulty_broker or broker, faulty_job, **kw)
    try:
        if clean is not None:
            clean.start_all()
        faulty.start_all()
        fault(faulty)
        report = _completed(faulty)
        if clean is not None:
            _CLEAN[key] = _Outcome.of(clean, _completed(clean))
    finally:
        if clean is not None:
            clean.stop_all()
        faulty.stop_all()
    reference = _CLEAN[key]
    # Sealed segments are ciphertext under fresh keys, different in every run: the aggregator's
    # own tensors are compared, and the sites' layers in the sites' own files (bit for bit).
    assert _same(_unsealed(faulty.weights()), _unsealed(reference.weights))
    for site in faulty.sites:  # each site's own layers too (flop: its private classifier)
        assert _same(faulty.site_weights(site), reference.site_weights[site])
    return faulty, report, reference.report


def _kill_aggregator_after(checkpoint: str) -> Callable[[Federation], None]:
    def fault(fed: Federation) -> None:
        fed.await_file(fed.checkpoints / checkpoint)
        assert fed.kill("aggregator") == -signal.SIGKILL
        fed.start("aggregator")  # the same command; the agents are not touched

    return fault


@pytest.mark.parametrize(
    ("mode", "orchestration"),
    [
        ("fedavg", "parallel"),
        ("flop", "parallel"),
        ("split-u", "parallel"),
        ("split", "sequential"),
    ],
)
def test_a_killed_aggregator_resumes_and_ends_bit_for_bit_like_an_uninterrupted_run(
    mosquitto: Mosquitto, tmp_path: Path, mode: str, orchestration: str
) -> None:
    fault = _kill_aggregator_after("round-00001.safetensors")
    job = _job(mode, orchestration, rounds=3)
    fed, report, reference = _against_clean(tmp_path, mosquitto, job, fault)
    assert report["faults"]["resumed_at"] == [1]
    assert [r["resumed"] for r in report["history"]] == [False, True, False]
    assert [r["trained"] for r in report["history"]] == [r["trained"] for r in reference["history"]]
    assert fed.starts["site-a"] == 1  # no agent was restarted


def _vertical_job(parties: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A three-party vertical job (U-shaped, the first party holds the labels) and each
    party's site settings."""
    job = _job("vertical", "parallel", rounds=3)
    job |= {
        "sites": parties,
        "plan": table_plan(parties, column_widths(30, 3), u_shaped=True),
        "defenses": {"gradient_noise": 0},
    }
    sites = {
        party: {
            "data": {
                "source": "builtin-vertical",
                "parties": 3,
                "index": index,
                "labels": not index,
            }
        }
        for index, party in enumerate(parties)
    }
    return job, sites


def test_a_killed_aggregator_of_a_vertical_job_aligns_again_and_resumes_bit_for_bit(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    parties = party_names(3)
    job, sites = _vertical_job(parties)
    fault = _kill_aggregator_after("round-00001.safetensors")
    fed, report, _ = _against_clean(tmp_path, mosquitto, job, fault, site_settings=sites)
    assert report["faults"]["resumed_at"] == [1]
    assert [r["trained"] for r in report["history"]] == [parties] * 3
    assert report["vertical"]["common_patients"] > 0 and report["sealed_segments"] is None
    aligned = fed.log("hospital").read_text().count("common to every party")
    assert aligned == 2  # once at the start, once for the restarted aggregator


def test_a_vertical_party_killed_mid_round_restarts_the_round_for_all_bit_for_bit(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The parties step together: when one is killed and comes back, every party redoes the
    round from its own snapshot and the trunk from where the round began, so the job ends as
    an uninterrupted one does -- whichever step the kill landed on."""
    parties = party_names(3)
    job, sites = _vertical_job(parties)
    killed = parties[1]  # a party without the labels

    def fault(fed: Federation) -> None:
        fed.await_file(fed.checkpoint(1))  # round 1 starts as this is written
        assert fed.kill(killed) == -signal.SIGKILL
        fed.start(killed)  # the same state directory: its aligned rows and round snapshot

    fed, report, _ = _against_clean(tmp_path, mosquitto, job, fault, site_settings=sites)
    assert [r["trained"] for r in report["history"]] == [parties] * 3
    assert fed.starts[killed] == 2 and fed.starts[parties[0]] == 1


def test_a_step_checkpoint_resumes_the_round_at_that_step_bit_for_bit(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    job = _job("split-u", "sequential", rounds=3)
    job["checkpoint"] = {"every_steps": 3, "keep": 10}
    # Round 1 (0-based), the second site's turn, before its step 6.
    fault = _kill_aggregator_after("round-00001-turn-0001-step-0000006.safetensors")
    fed, report, _ = _against_clean(tmp_path, mosquitto, job, fault)
    # The kill lands at step 6's checkpoint or, the job being fast, at a later one of the turn.
    resumed = re.search(r"going on from round 1 step (\d+)", fed.log("site-b").read_text())
    assert resumed is not None and int(resumed.group(1)) % 3 == 0 and int(resumed.group(1)) >= 6
    assert report["history"][1]["resumed"] and report["history"][1]["trained"] == fed.sites


def test_a_pipelined_job_killed_at_a_step_checkpoint_resumes_there_bit_for_bit(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Micro-batches in flight when the aggregator dies are lost with it; the step they
    belonged to is redone whole from the checkpoint taken before its first micro-batch."""
    job = _job("split-u", "sequential", rounds=2)
    job["training"] = {"micro_batches": 4}
    job["checkpoint"] = {"every_steps": 3, "keep": 10}
    fault = _kill_aggregator_after("round-00000-turn-0001-step-0000006.safetensors")
    fed, report, _ = _against_clean(tmp_path, mosquitto, job, fault)
    resumed = re.search(r"going on from round 0 step (\d+)", fed.log("site-b").read_text())
    assert resumed is not None and int(resumed.group(1)) % 3 == 0 and int(resumed.group(1)) >= 6
    assert report["history"][0]["resumed"] and report["history"][0]["trained"] == fed.sites


def test_sigterm_stops_the_aggregator_cleanly_and_a_restart_continues(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    fed = _federation(tmp_path, "fed", mosquitto, _job("split-u", "sequential", rounds=3))
    try:
        fed.start_all()
        fed.await_file(fed.checkpoint(1))
        assert fed.kill("aggregator", signal.SIGTERM) == 0
        interrupted = fed.report()
        assert interrupted["status"] == "interrupted"
        assert "Traceback" not in fed.log("aggregator").read_text()
        fed.start("aggregator")
        report = _completed(fed)
    finally:
        fed.stop_all()
    assert report["faults"]["resumed_at"] and len(report["history"]) == 3
    assert all(r["missed"] == [] for r in report["history"])


def test_a_site_killed_for_good_is_not_waited_for(mosquitto: Mosquitto, tmp_path: Path) -> None:
    # Rounds of this job take a fraction of a second: by the time the kill lands the site may
    # have answered a round or two more. Whenever it went, it is never trained again, and the
    # job's last rounds go on without it.
    job = _job("fedavg", "parallel", sites=3, rounds=6, min_sites=2, finish_deadline_s=5)
    fed = _federation(tmp_path, "fed", mosquitto, job)
    try:
        fed.start_all()
        fed.await_file(fed.checkpoint(1))
        fed.kill("site-c")
        report = _completed_except(fed, "site-c")
    finally:
        fed.stop_all()
    history = report["history"]
    gone = next(i for i, r in enumerate(history) if "site-c" not in r["trained"])
    assert gone >= 1  # it trained until it was killed, once round 0 was checkpointed
    assert all("site-c" not in r["trained"] for r in history[gone:])  # gone: not trained
    assert all("site-c" in r["missed"] for r in history[gone:])
    assert all(set(r["trained"]) >= {"site-a", "site-b"} for r in history)
    assert report["faults"]["unconfirmed_finish"] == ["site-c"]


def _completed_except(fed: Federation, dead: str) -> dict[str, Any]:
    for name in fed.processes:
        if name != dead:
            code = fed.wait(name, TIMEOUT)
            assert code == 0, fed.tail(name)
    report = fed.report()
    assert report["status"] == "completed"
    return report


@pytest.mark.parametrize("persistence", [False, True])
def test_a_broker_restart_mid_job_loses_nothing_and_applies_nothing_twice(
    mosquitto: Mosquitto, tmp_path: Path, persistence: bool
) -> None:
    broker = Mosquitto(tmp_path / "broker", persistence=persistence).start()

    def fault(fed: Federation) -> None:
        fed.await_file(fed.checkpoint(1))
        broker.kill()  # sessions, retained presence and queued messages go with it (unsaved)
        broker.start()  # same port, same configuration: a crashed broker coming back

    try:
        job = _job("split-u", "parallel", rounds=3)
        _, report, _ = _against_clean(tmp_path, mosquitto, job, fault, faulty_broker=broker)
    finally:
        broker.stop()
    assert all(r["missed"] == [] for r in report["history"])  # nobody waited out a deadline
    assert len(report["history"]) == 3


@pytest.mark.parametrize(
    ("mode", "orchestration", "how", "precision"),
    [
        ("split-u", "sequential", signal.SIGKILL, "fp32"),
        ("flop", "parallel", signal.SIGTERM, "fp32"),
        # bf16 autocast on both sides of the cut: the snapshots still resume bit for bit.
        ("split-u", "parallel", signal.SIGKILL, "bf16"),
    ],
)
def test_a_site_stopped_mid_round_and_restarted_rejoins_and_the_job_ends_bit_for_bit(  # noqa: PLR0917
    mosquitto: Mosquitto,
    tmp_path: Path,
    mode: str,
    orchestration: str,
    how: signal.Signals,
    precision: str,
) -> None:
    def fault(fed: Federation) -> None:
        fed.await_file(fed.checkpoint(1))
        status = fed.kill("site-b", how)
        assert status == (0 if how == signal.SIGTERM else -signal.SIGKILL), fed.tail("site-b")
        if how == signal.SIGTERM:  # a clean stop: no traceback
            assert "Traceback" not in fed.log("site-b").read_text()
        fed.start("site-b")  # a fresh process with the same state directory

    # min_sites is every site, so the round waits for it to come back. The restarted site takes
    # up its snapshot and the aggregator puts the trunk back where the site's turn began: the
    # redone turn is the turn it would have been.
    job = _job(mode, orchestration, rounds=3)
    job["training"] = {"precision": precision}
    fed, report, _ = _against_clean(tmp_path, mosquitto, job, fault)
    assert all(r["trained"] == fed.sites for r in report["history"])
    assert (fed.state_dir("site-b") / "site-model.safetensors").is_file()


def test_a_site_offline_at_the_end_still_gets_its_final_model_when_it_returns(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    job = _job("fedavg", "parallel", sites=2, rounds=3, min_sites=1, finish_deadline_s=LONG)
    fed = _federation(tmp_path, "fed", mosquitto, job)
    try:
        fed.start_all()
        fed.await_file(fed.checkpoint(1))
        fed.kill("site-b")
        fed.await_log("aggregator", "waiting for site-b to confirm")
        assert not (fed.state_dir("site-b") / "site-model.safetensors").exists()
        fed.start("site-b")
        report = _completed(fed)
    finally:
        fed.stop_all()
    assert (fed.state_dir("site-b") / "site-model.safetensors").is_file()
    assert report["faults"]["unconfirmed_finish"] == []
