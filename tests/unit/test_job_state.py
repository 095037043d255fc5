"""The aggregator's job as a pure state machine: events in, state and messages out, fake clock.

No threads, no transport: every test feeds ``JobMachine.step`` the events a driver would and
reads what it would send.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from aggregator.state import (
    Checkpoint,
    Evaluated,
    Event,
    FinishAcked,
    Forget,
    Hello,
    JobMachine,
    JobState,
    Out,
    Phase,
    Revoked,
    Send,
    SitePresence,
    StatsReported,
    Tick,
    TrainDone,
    initial_state,
    resumed_state,
)
from aggregator.strategy import Cyclic, FedAvg, Reply
from medsplit.protocol import Kind
from medsplit.statistics import FeatureSums

WEIGHTS = {"w": torch.zeros(2)}
DEADLINE = 10.0


def _machine(
    strategy: FedAvg | Cyclic,
    *,
    rounds: int = 1,
    quorum: int = 1,
    normalization: tuple[torch.Tensor, torch.Tensor] | tuple[()] | None = (),
) -> JobMachine:
    """A job's rules; without a statistics round unless ``normalization`` is None."""
    return JobMachine(
        strategy,
        rounds=rounds,
        quorum=quorum,
        round_deadline_s=DEADLINE,
        local_epochs=1,
        normalization=normalization,
    )


class Job:
    """A machine, its state and a fake clock; ``feed`` keeps every message sent."""

    def __init__(self, machine: JobMachine, sites: Sequence[str], join_deadline_s: float = 5.0):
        self.machine = machine
        self.now = 0.0
        self.state: JobState = initial_state(list(sites), WEIGHTS, self.now, join_deadline_s)
        self.sent: list[Out] = []

    def feed(self, event: Event, at: float | None = None) -> list[Out]:
        if at is not None:
            self.now = at
        self.state, out = self.machine.step(self.state, event, self.now)
        self.sent += out
        return out

    def hello(self, site: str, incarnation: str = "one") -> list[Out]:
        return self.feed(Hello(site, incarnation, train_samples=10, test_samples=5))

    def done(self, site: str, value: float = 1.0) -> list[Out]:
        reply = Reply(site, {"w": torch.full((2,), value)}, samples=10)
        return self.feed(TrainDone(site, self.state.round, reply, 0.5, 0.1))

    def evaluated(self, site: str) -> list[Out]:
        return self.feed(Evaluated(site, self.state.round, {"accuracy": 0.9, "loss": 0.1}))

    def kinds(self, site: str) -> list[Kind]:
        return [m.kind for m in self.sent if isinstance(m, Send) and m.site == site]


def test_a_repeated_hello_gets_setup_again_and_never_a_second_request() -> None:
    job = Job(_machine(FedAvg()), ["a", "b"])
    job.hello("a")
    job.hello("b")  # everyone is in: round 0 starts
    assert job.kinds("a") == [Kind.SETUP, Kind.TRAIN]
    out = job.hello("a")  # the same agent said hello twice (its first hello crossed setup)
    assert [m.kind for m in out if isinstance(m, Send)] == [Kind.SETUP]
    assert job.kinds("a").count(Kind.TRAIN) == 1
    assert job.state.waiting_for == ["a", "b"]


def test_a_restarted_agent_is_asked_again_what_its_old_process_took_with_it() -> None:
    job = Job(_machine(FedAvg()), ["a"])
    job.hello("a", incarnation="first")
    out = job.hello("a", incarnation="second")
    assert Forget("a") in out  # its unfinished split steps are void
    assert [m.kind for m in out if isinstance(m, Send)] == [Kind.SETUP, Kind.TRAIN]
    job.done("a")
    out = job.hello("a", incarnation="third")  # restarted after answering: nothing to repeat
    assert [m.kind for m in out if isinstance(m, Send)] == [Kind.SETUP, Kind.EVALUATE]


def test_parties_in_lockstep_all_redo_the_round_when_one_restarts() -> None:
    """Vertical parties step together: b restarting voids a's finished round too, so both are
    asked again (new requests) and a's earlier answer no longer counts."""
    job = Job(replace(_machine(FedAvg(), quorum=2), lockstep=True), ["a", "b"])
    job.hello("a")
    job.hello("b")
    job.done("a")
    assert job.state.waiting_for == ["b"]
    out = job.hello("b", incarnation="two")
    assert Forget("a") in out and Forget("b") in out
    assert [(m.site, m.kind) for m in out if isinstance(m, Send) and m.kind == Kind.TRAIN] == [
        ("a", Kind.TRAIN),
        ("b", Kind.TRAIN),
    ]
    assert job.state.waiting_for == ["a", "b"]
    job.done("a")
    job.done("b")  # the round goes on to its evaluation, whose restart redoes it for both
    assert job.state.phase == Phase.EVALUATING
    job.evaluated("a")
    out = job.hello("a", incarnation="three")
    assert [(m.site, m.kind) for m in out if isinstance(m, Send)][1:] == [
        ("a", Kind.EVALUATE),
        ("b", Kind.EVALUATE),
    ]
    assert job.state.waiting_for == ["a", "b"]


def test_a_round_is_train_then_evaluate_then_the_next_round_then_finish() -> None:
    job = Job(_machine(FedAvg(), rounds=2), ["a", "b"])
    job.hello("a")
    job.hello("b")
    job.done("a", 1.0)
    assert job.state.phase == Phase.TRAINING and job.state.waiting_for == ["b"]
    job.done("b", 3.0)
    assert job.state.phase == Phase.EVALUATING
    torch.testing.assert_close(job.state.weights["w"], torch.full((2,), 2.0))
    job.evaluated("a")
    job.evaluated("b")
    assert job.state.round == 1 and job.state.phase == Phase.TRAINING
    for site in ("a", "b"):
        job.done(site)
    for site in ("a", "b"):
        job.evaluated(site)
    assert job.state.phase == Phase.FINISHED
    assert job.kinds("a")[-1] == Kind.FINISH
    assert [r.trained for r in job.state.history] == [["a", "b"], ["a", "b"]]
    assert job.state.history[0].mean()["accuracy"] == 0.9


def test_cyclic_rounds_hand_weights_on_one_site_at_a_time() -> None:
    job = Job(_machine(Cyclic()), ["a", "b", "c"])
    for site in ("a", "b", "c"):
        job.hello(site)
    assert job.state.waiting_for == ["a"]
    job.done("a", 5.0)
    assert job.state.waiting_for == ["b"]
    train_b = [
        m for m in job.sent if isinstance(m, Send) and m.site == "b" and m.kind == Kind.TRAIN
    ]
    torch.testing.assert_close(train_b[0].tensors["w"], torch.full((2,), 5.0))  # handed on


def test_one_deadline_covers_the_whole_round_whatever_the_number_of_turns() -> None:
    job = Job(_machine(Cyclic(), rounds=2), ["a", "b", "c"])
    for site in ("a", "b", "c"):
        job.hello(site)
    job.feed(Tick(), at=1.0)
    job.done("a")
    job.feed(Tick(), at=DEADLINE)  # b never answered: at the round's deadline the round closes
    record = job.state.history[0]
    assert record.trained == ["a"] and record.missed == ["b", "c"]
    assert job.kinds("c").count(Kind.TRAIN) == 0  # no turn after the deadline
    assert Forget("b") in job.sent
    assert job.state.round == 1  # the next round has its own deadline
    assert job.state.deadline == DEADLINE + DEADLINE


def test_min_sites_holds_in_sequential_rounds_too() -> None:
    job = Job(_machine(Cyclic(), quorum=2), ["a", "b"])
    job.hello("a")
    job.hello("b")
    job.done("a")
    job.feed(Tick(), at=DEADLINE)
    assert job.state.phase == Phase.FAILED
    assert "only 1 sites trained" in (job.state.failure or "")
    assert "missed b" in (job.state.failure or "")


def test_joining_fails_at_the_deadline_naming_who_is_missing() -> None:
    job = Job(_machine(FedAvg(), quorum=2), ["a", "b", "c"], join_deadline_s=5.0)
    job.hello("a")
    job.feed(Tick(), at=4.9)
    assert job.state.phase == Phase.JOINING and job.state.waiting_for == ["b", "c"]
    job.feed(Tick(), at=5.0)
    assert job.state.phase == Phase.FAILED
    assert "missing b, c" in (job.state.failure or "")


def test_the_quorum_starts_the_job_at_the_join_deadline() -> None:
    job = Job(_machine(FedAvg(), quorum=1), ["a", "b"], join_deadline_s=5.0)
    job.hello("a")
    job.feed(Tick(), at=5.0)
    assert job.state.phase == Phase.TRAINING and job.state.waiting_for == ["a"]


def test_late_and_unasked_replies_are_counted_not_used() -> None:
    job = Job(_machine(FedAvg(), rounds=2), ["a"])
    job.hello("a")
    job.done("a", 4.0)
    stale = Reply("a", {"w": torch.full((2,), 9.0)}, samples=10)
    job.feed(TrainDone("a", 0, stale, 0.1, 0.1))  # a second done for round 0
    assert job.state.late_messages == 1
    torch.testing.assert_close(job.state.weights["w"], torch.full((2,), 4.0))


def test_a_refused_reply_is_answered_with_an_error_and_counts_as_missed() -> None:
    job = Job(_machine(FedAvg()), ["a"])
    job.hello("a")
    bad = Reply("a", {"other": torch.ones(2)}, samples=10)
    out = job.feed(TrainDone("a", 0, bad, 0.1, 0.1))
    errors = [m for m in out if isinstance(m, Send) and m.kind == Kind.ERROR]
    assert errors and errors[0].meta["error"] == "ReplyRefused"
    assert job.state.phase == Phase.FAILED  # the only site's reply was refused: no quorum


def test_the_state_is_a_value_that_every_step_replaces() -> None:
    job = Job(_machine(FedAvg()), ["a"])
    before = job.state
    job.hello("a")
    assert before.phase == Phase.JOINING and not before.sites["a"].joined  # untouched
    assert job.state.sites["a"].joined and job.state.sites["a"].incarnation == "one"


def _sums(values: list[float]) -> FeatureSums:
    return FeatureSums.of(torch.tensor(values, dtype=torch.float64)[:, None])


def test_the_statistics_round_combines_sums_and_every_site_gets_the_result() -> None:
    job = Job(_machine(FedAvg(), normalization=None), ["a", "b"])
    job.hello("a")
    job.hello("b")
    assert job.state.phase == Phase.STATISTICS
    assert job.kinds("a") == [Kind.SETUP, Kind.STATS_REQUEST]
    job.feed(StatsReported("a", _sums([1.0, 2.0, 3.0])))
    assert job.state.waiting_for == ["b"]
    out = job.feed(StatsReported("b", _sums([4.0, 5.0])))
    sent = [m for m in out if isinstance(m, Send)]
    assert [(m.site, m.kind) for m in sent] == [
        ("a", Kind.NORMALIZATION),
        ("b", Kind.NORMALIZATION),
        ("a", Kind.TRAIN),
        ("b", Kind.TRAIN),
    ]
    pooled = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # what pooling the values would give
    torch.testing.assert_close(sent[0].tensors["mean"], pooled.mean()[None])
    torch.testing.assert_close(sent[0].tensors["std"], pooled.std()[None])
    # A site that restarts later is set up and normalised again before anything else.
    out = job.hello("b", incarnation="two")
    kinds = [m.kind for m in out if isinstance(m, Send)]
    assert kinds == [Kind.SETUP, Kind.NORMALIZATION, Kind.TRAIN]


def test_a_fixed_normalisation_skips_the_statistics_round() -> None:
    fixed = (torch.tensor([0.5]), torch.tensor([0.25]))
    job = Job(_machine(FedAvg(), normalization=fixed), ["a"])
    job.hello("a")
    assert job.kinds("a") == [Kind.SETUP, Kind.NORMALIZATION, Kind.TRAIN]
    normalization = next(
        m for m in job.sent if isinstance(m, Send) and m.kind == Kind.NORMALIZATION
    )
    assert torch.equal(normalization.tensors["std"], fixed[1])


def test_statistics_missing_at_the_deadline_fail_the_job_below_quorum() -> None:
    job = Job(_machine(FedAvg(), normalization=None, quorum=2), ["a", "b"])
    job.hello("a")
    job.hello("b")
    job.feed(StatsReported("a", _sums([1.0, 2.0])))
    job.feed(Tick(), at=DEADLINE)
    assert job.state.phase == Phase.FAILED
    assert "missing b" in (job.state.failure or "")


# -- checkpoints and resume ------------------------------------------------------------------------


def _round(job: Job, sites: Sequence[str]) -> None:
    for site in sites:
        job.done(site)
    for site in sites:
        job.evaluated(site)


def test_each_closed_round_is_checkpointed_before_the_next_round_is_sent() -> None:
    job = Job(_machine(FedAvg(), rounds=3), ["a", "b"])
    job.hello("a")
    job.hello("b")
    job.done("a")
    job.done("b")
    job.evaluated("a")
    out = job.evaluated("b")
    checkpoint = next(i for i, m in enumerate(out) if isinstance(m, Checkpoint))
    first_train = next(i for i, m in enumerate(out) if isinstance(m, Send) and m.kind == Kind.TRAIN)
    assert checkpoint < first_train
    point = out[checkpoint].point  # type: ignore[union-attr]
    assert point.round == 1 and len(point.history) == 1
    assert torch.equal(point.weights["w"], job.state.weights["w"])  # what round 1 starts from


def test_a_resumed_job_rejoins_then_goes_on_from_its_checkpoint_without_statistics() -> None:
    job = Job(_machine(FedAvg(), rounds=4, normalization=None), ["a", "b"])
    job.hello("a")
    job.hello("b")
    for site in ("a", "b"):
        job.feed(StatsReported(site, FeatureSums(10, torch.ones(2), torch.ones(2))))
    _round(job, ["a", "b"])
    _round(job, ["a", "b"])
    point = job.state.resume_point()
    assert point.round == 2 and point.normalization is not None

    resumed = Job(job.machine, ["a", "b"])
    resumed.state = resumed_state(point, ["a", "b"], 100.0, 5.0)
    assert resumed.state.phase == Phase.JOINING and len(resumed.state.history) == 2
    resumed.hello("a")  # the same agent processes, still running
    out = resumed.hello("b")
    kinds = [m.kind for m in out if isinstance(m, Send)]
    assert Kind.STATS_REQUEST not in resumed.kinds("a") + resumed.kinds("b")
    assert kinds.count(Kind.NORMALIZATION) == 2 and kinds.count(Kind.TRAIN) == 2
    assert resumed.state.round == 2 and resumed.state.record is not None
    assert resumed.state.record.resumed and resumed.state.resumed_at == (2,)
    _round(resumed, ["a", "b"])
    _round(resumed, ["a", "b"])
    assert resumed.state.phase == Phase.FINISHED  # no finish_linger_s: done once finish is sent
    assert [r.round for r in resumed.state.history] == [0, 1, 2, 3]
    assert [r.resumed for r in resumed.state.history] == [False, False, True, False]


def test_a_job_resumed_after_its_last_round_only_finishes_and_needs_no_finished_site() -> None:
    machine = replace(_machine(FedAvg(), rounds=1), finish_linger_s=30.0)
    job = Job(machine, ["a", "b"])
    job.hello("a")
    job.hello("b")
    _round(job, ["a", "b"])
    job.feed(FinishAcked("a"))
    out = job.feed(Tick(), at=31.0)  # b never confirmed
    assert job.state.phase == Phase.FINISHED
    point = next(m.point for m in out if isinstance(m, Checkpoint))  # saved once more
    assert point.round == 1 and point.sites["a"].finished and not point.sites["b"].finished

    resumed = Job(job.machine, ["a", "b"])
    resumed.state = resumed_state(point, ["a", "b"], 0.0, 5.0)
    assert resumed.state.waiting_for == ["b"]  # a has its model; it will not come back
    out = resumed.hello("b")
    assert [m.kind for m in out if isinstance(m, Send)] == [Kind.SETUP, Kind.FINISH]
    assert resumed.state.phase == Phase.FINISHING and resumed.state.waiting_for == ["b"]
    resumed.feed(FinishAcked("b"))
    assert resumed.state.phase == Phase.FINISHED


def test_finish_waits_for_every_receipt_and_sends_it_again_to_a_site_that_returns() -> None:
    machine = replace(_machine(FedAvg(), rounds=1, quorum=1), finish_linger_s=30.0)
    job = Job(machine, ["a", "b"])
    job.hello("a")
    job.hello("b")
    _round(job, ["a", "b"])
    assert job.state.phase == Phase.FINISHING and job.state.waiting_for == ["a", "b"]
    job.feed(FinishAcked("a"))
    job.feed(SitePresence("b", online=False))
    assert job.state.waiting_for == ["b"]  # offline: still waited for, it may come back
    out = job.hello("b", incarnation="restarted")
    assert [m.kind for m in out if isinstance(m, Send)][-1] == Kind.FINISH
    job.feed(Tick(), at=job.now + 31.0)
    assert job.state.phase == Phase.FINISHED  # b never confirmed: the job ends at the deadline


def test_an_offline_site_is_not_waited_for_while_the_live_ones_make_the_quorum() -> None:
    job = Job(_machine(FedAvg(), rounds=2, quorum=2), ["a", "b", "c"])
    for site in ("a", "b", "c"):
        job.hello(site)
    job.done("a")
    job.done("b")
    job.feed(SitePresence("c", online=False), at=1.0)  # its Last Will
    assert job.state.phase == Phase.EVALUATING  # closed at once, not at the deadline
    assert job.state.record is not None and job.state.record.missed == ["c"]
    # With two sites gone the live one cannot make min_sites=2: wait for them to come back.
    job.evaluated("a")
    job.feed(SitePresence("b", online=False), at=2.0)
    assert job.state.phase == Phase.EVALUATING and job.state.waiting_for == ["b", "c"]


def test_a_replayed_hello_of_an_earlier_agent_process_is_dropped_mid_turn() -> None:
    job = Job(_machine(FedAvg()), ["a"])
    job.hello("a", incarnation="first")
    job.hello("a", incarnation="second")  # the agent restarted
    late = job.state.late_messages
    out = job.hello("a", incarnation="first")  # a replay of the first process's hello
    assert out == [] and job.state.late_messages == late + 1
    assert job.state.sites["a"].incarnation == "second"


# -- a site cannot inflate itself; a revoked one is out -----------------------------------------


def test_an_update_claiming_more_samples_than_declared_at_join_is_refused() -> None:
    job = Job(_machine(FedAvg(), quorum=1), ["a", "b"])
    job.hello("a")
    job.hello("b")
    job.feed(Hello("b", "one", train_samples=10_000, test_samples=5))  # cannot raise it later
    assert job.state.sites["b"].train_samples == 10
    job.done("a", 1.0)
    out = job.feed(TrainDone("b", 0, Reply("b", {"w": torch.full((2,), 9.0)}, 11), 0.5, 0.1))
    refusal = [m for m in out if isinstance(m, Send) and m.kind == Kind.ERROR]
    assert refusal and "claims 11 samples but declared 10" in refusal[0].meta["detail"]
    assert job.state.phase == Phase.EVALUATING  # not waited for
    assert torch.equal(job.state.weights["w"], torch.ones(2))  # only a's update counted


def test_a_revoked_site_is_not_waited_for_asked_or_sent_the_final_model() -> None:
    job = Job(_machine(FedAvg(), rounds=2, quorum=1), ["a", "b"])
    job.hello("a")
    job.hello("b")
    job.done("a")
    job.feed(Revoked("b"))
    assert job.state.phase == Phase.EVALUATING  # b's update is no longer awaited
    job.feed(Hello("b", "two", train_samples=10, test_samples=5))  # a new process: ignored
    assert job.state.sites["b"].revoked and not job.state.sites["b"].connected
    job.feed(Evaluated("a", 0, {"accuracy": 1.0}))
    assert job.state.asked == ("a",)  # round 2 asks only a
    job.done("a")
    job.feed(Evaluated("a", 1, {"accuracy": 1.0}))
    finish = [m.site for m in job.sent if isinstance(m, Send) and m.kind == Kind.FINISH]
    assert finish == ["a"]
    job.feed(FinishAcked("a"))
    assert job.state.phase == Phase.FINISHED
    setups = [m.site for m in job.sent if isinstance(m, Send) and m.kind == Kind.SETUP]
    assert setups == ["a", "b"]  # nothing answered b's hello after the revocation
