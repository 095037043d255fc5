"""The agent's lifecycle as a pure value: a fake clock in, actions out, no threads."""

from __future__ import annotations

import itertools

from edge_agent.lifecycle import AgentPhase, Lifecycle, Report, SayHello
from medsplit.protocol.presence import Presence


def _aggregator(incarnation: str, state: str = "online") -> Presence:
    return Presence("aggregator", "aggregator", state, incarnation, 0.0)  # type: ignore[arg-type]


def _hellos_until(life: Lifecycle, end: float, step: float = 0.05) -> tuple[Lifecycle, list[float]]:
    said, now = [], 0.0
    while now <= end:
        life, actions = life.tick(now)
        said += [now for a in actions if isinstance(a, SayHello)]
        now = round(now + step, 4)
    return life, said


def test_an_announcing_agent_says_hello_at_once_then_backs_off_to_its_interval() -> None:
    life, said = _hellos_until(Lifecycle("a", "j", hello_interval_s=1.0), 4.0)
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(said)]
    assert said[0] == 0.0
    assert gaps[:3] == [0.25, 0.5, 1.0] and set(gaps[3:]) == {1.0}
    assert life.hellos_total == len(said)


def test_setup_stops_the_hellos() -> None:
    life, _ = Lifecycle("a", "j").tick(0.0)
    life = life.set_up()
    assert life.phase == AgentPhase.READY
    life, said = _hellos_until(life, 30.0)
    assert said == []


def test_a_new_epoch_resets_the_backoff_and_a_set_up_agent_rejoins_until_answered() -> None:
    life, _ = _hellos_until(Lifecycle("a", "j", hello_interval_s=5.0), 20.0)
    life, actions = life.saw_aggregator(_aggregator("e1"), 20.0)
    assert life.next_hello == 20.0 and life.hellos == 0  # hello again at once
    life = life.set_up()
    life, actions = life.saw_aggregator(_aggregator("e1"), 21.0)  # same epoch: nothing
    assert actions == []
    before = life.hellos_total
    life, actions = life.saw_aggregator(_aggregator("e2"), 22.0)  # it restarted
    assert SayHello() in actions and life.hellos_total == before + 1
    assert life.phase == AgentPhase.READY  # still set up: the setup will be the same job
    # That hello may be lost (the new aggregator was not listening yet): it is repeated with
    # the same backoff until the new epoch's setup comes.
    life, said = _hellos_until(life, 30.0)
    assert len(said) >= 3 and life.rejoining
    life = life.set_up()
    life, said = _hellos_until(life, 60.0)
    assert said == [] and not life.rejoining and life.phase == AgentPhase.READY


def test_offline_aggregators_and_probes() -> None:
    life, actions = Lifecycle("a", "j").saw_aggregator(_aggregator("e1"), 0.0)
    life, actions = life.saw_aggregator(_aggregator("e1", "offline"), 1.0)
    assert life.aggregator is None and any(isinstance(a, Report) and a.warning for a in actions)
    life, actions = life.saw_aggregator(_aggregator("x", "probe"), 2.0)
    assert life.aggregator is None and actions == []


def test_every_wait_is_reported_at_the_status_interval_naming_what_it_waits_for() -> None:
    life = Lifecycle("site-a", "job-1", status_interval_s=10.0)
    reports = []
    for now in (0.0, 5.0, 10.0, 15.0, 20.0):
        life, actions = life.tick(now)
        reports += [(now, a.text) for a in actions if isinstance(a, Report)]
    assert [t for t, _ in reports] == [10.0, 20.0]
    assert "waiting for the aggregator of job job-1: none is online yet" in reports[0][1]
    life, _ = life.saw_aggregator(_aggregator("e1"), 21.0)
    life = life.set_up()
    life, actions = life.tick(30.0)
    assert [a.text for a in actions if isinstance(a, Report)] == [
        "site-a: joined job job-1; waiting for the aggregator's next request"
    ]


def test_work_returns_to_ready_unless_the_job_ended_meanwhile() -> None:
    life = Lifecycle("a", "j").set_up().working(AgentPhase.TRAINING)
    assert life.idle(AgentPhase.TRAINING).phase == AgentPhase.READY
    assert life.finished().idle(AgentPhase.TRAINING).phase == AgentPhase.FINISHED
    refused = Lifecycle("a", "j").refused("not in the job")
    assert refused.done and refused.refusal == "not in the job"
