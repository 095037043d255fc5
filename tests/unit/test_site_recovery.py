"""A site's snapshots: a redone round starts where the first attempt started; a restarted
agent goes on from what it persisted; step snapshots are bounded."""

from __future__ import annotations

from pathlib import Path

import torch

from edge_agent.local_model import LocalModel
from edge_agent.recovery import KEPT_STEP_SNAPSHOTS, RESUME_FILE, Recovery
from edge_agent.segments import EdgeSegments
from medsplit.protocol import JobSpec
from tests.support.configs import job_config


def _spec(mode: str, plan: str) -> JobSpec:
    config = job_config({"job_id": "job-r", "plan": plan, "mode": mode, "sites": ["a"]})
    return JobSpec(
        job_id=config.job_id,
        mode=config.mode,
        orchestration=config.orchestration,
        plan=config.plan,
        rounds=3,
        local_epochs=1,
        batch_size=8,
        optimizer=config.training.optimizer,
        seed=0,
        wire_dtype="float32",
        release_trunk=True,
    )


def _train(segments: LocalModel | EdgeSegments) -> None:
    """One optimizer step on random data: weights and moments move."""
    modules = [segments.model] if isinstance(segments, LocalModel) else segments.modules()
    segments.optimizer.zero_grad()
    loss = sum((p.sum() * torch.rand(())) for m in modules for p in m.parameters())
    loss.backward()  # type: ignore[union-attr]
    segments.optimizer.step()


def _state(segments: LocalModel | EdgeSegments) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in segments.full_state().items()}


def test_a_redone_round_starts_exactly_where_its_first_attempt_started(tmp_path: Path) -> None:
    for mode, plan in (("flop", "mlp-ehr"), ("split-u", "mlp-ehr-u")):
        spec = _spec(mode, plan)
        segments = (
            LocalModel(spec, torch.device("cpu"))
            if spec.federated
            else EdgeSegments(spec, torch.device("cpu"))
        )
        recovery = Recovery("a", "job-r", tmp_path / mode)
        recovery.before_round(segments, 0)
        before = _state(segments)
        _train(segments)
        _train(segments)  # the attempt that a crash of the aggregator cut short
        recovery.before_round(segments, 0)  # asked round 0 again
        assert all(torch.equal(before[k], v) for k, v in _state(segments).items())
        assert recovery.redone_rounds == [0]
        moments = segments.optimizer.state_dict()["state"]
        assert moments == {} or all(not torch.any(e["exp_avg"]) for e in moments.values())


def test_a_restarted_agent_goes_on_from_the_state_it_persisted(tmp_path: Path) -> None:
    spec = _spec("split-u", "mlp-ehr-u")
    segments = EdgeSegments(spec, torch.device("cpu"))
    recovery = Recovery("a", "job-r", tmp_path)
    recovery.before_round(segments, 0)
    _train(segments)
    recovery.after_round(segments, 0)  # round 0 done: on disk, the state before round 1
    trained = _state(segments)
    moments = segments.optimizer.state_dict()["state"]

    again = EdgeSegments(spec, torch.device("cpu"))  # a new process
    restarted = Recovery("a", "job-r", tmp_path)
    restarted.load(again)
    assert all(torch.equal(trained[k], v) for k, v in _state(again).items())
    loaded = again.optimizer.state_dict()["state"]
    assert all(torch.equal(moments[i]["exp_avg"], loaded[i]["exp_avg"]) for i in moments)
    restarted.before_round(again, 1)  # the next round is not a redo
    assert restarted.redone_rounds == []

    other = Recovery("a", "another-job", tmp_path)  # another job's file is not taken
    fresh = EdgeSegments(spec, torch.device("cpu"))
    other.load(fresh)
    assert other.round is None
    (tmp_path / RESUME_FILE).write_bytes(b"torn")
    broken = Recovery("a", "job-r", tmp_path)
    broken.load(fresh)  # logged and ignored: the site starts from the job's weights
    assert broken.round is None


def test_step_snapshots_are_bounded_and_restore_their_step(tmp_path: Path) -> None:
    spec = _spec("split-u", "mlp-ehr-u")
    segments = EdgeSegments(spec, torch.device("cpu"))
    recovery = Recovery("a", "job-r", None)
    recovery.before_round(segments, 0)
    states = {}
    for step in (3, 6, 9, 12):
        _train(segments)
        recovery.keep_step(segments, 0, step, loss_sum=float(step), seen=step * 8)
        states[step] = _state(segments)
    assert len(recovery.steps) == KEPT_STEP_SNAPSHOTS
    assert recovery.go_on_from(segments, 0, 3) is None  # too old: the round starts over
    _train(segments)
    snapshot = recovery.go_on_from(segments, 0, 9)
    assert snapshot is not None and snapshot.seen == 72
    assert all(torch.equal(states[9][k], v) for k, v in _state(segments).items())


def test_an_fp16_site_resumes_with_its_loss_scale(tmp_path: Path) -> None:
    spec = _spec("split-u", "mlp-ehr-u").model_copy(update={"precision": "fp16"})
    segments = EdgeSegments(spec, torch.device("cpu"))
    segments.amp.load(  # where its overflows had brought it
        {"amp/scale": torch.tensor(1024.0), "amp/growth_tracker": torch.tensor(7)}
    )
    recovery = Recovery("a", "job-r", tmp_path)
    recovery.before_round(segments, 0)
    _train(segments)
    recovery.after_round(segments, 0)

    again = EdgeSegments(spec, torch.device("cpu"))  # a new process: a fresh 65536
    assert again.amp.scale == 65536.0
    Recovery("a", "job-r", tmp_path).load(again)
    assert again.amp.scale == 1024.0
    assert again.amp.scaler.state_dict()["_growth_tracker"] == 7
