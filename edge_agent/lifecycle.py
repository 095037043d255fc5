"""The agent's position in a job, as one value, and its pure transitions.

``Lifecycle`` is what an agent knows about its job outside the training maths: its phase, the
live aggregator (from its presence), how many hellos it has said and when the next one is due,
when it last said what it waits for, and why it was refused. Every transition takes the time
as an argument and returns the next value and what to do (``SayHello``, ``Report``); the agent
only carries them out. The unit tests drive it with a fake clock, and issue 13's agent
checkpoint will persist this value.

Announcing: a hello at once, then after 0.25, 0.5, 1 s ... up to ``hello_interval_s``, until
``setup`` arrives. A new aggregator epoch resets that backoff, and an agent that is already set
up *rejoins*: it says hello the same way until the new epoch's ``setup`` arrives, so one lost
hello cannot leave a restarted aggregator waiting for it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from medsplit.modes import TextEnum
from medsplit.protocol.presence import Presence


class AgentPhase(TextEnum):
    ANNOUNCING = "announcing"  # hello until the aggregator answers with setup
    READY = "ready"  # set up, waiting for a request
    TRAINING = "training"
    EVALUATING = "evaluating"
    FINISHED = "finished"
    REFUSED = "refused"


@dataclass(frozen=True)
class SayHello:
    """Send ``hello`` now."""


@dataclass(frozen=True)
class Report:
    """Log this line (``warning`` for bad news)."""

    text: str
    warning: bool = False


Action = SayHello | Report


def hello_delay(hellos_sent: int, interval_s: float) -> float:
    """Seconds until the next hello: quick at first (the aggregator may be subscribing right
    now), then doubling up to ``interval_s``."""
    return min(interval_s, 0.25 * 2.0**hellos_sent)


@dataclass(frozen=True)
class Lifecycle:
    site_id: str
    job_id: str
    hello_interval_s: float = 5.0
    status_interval_s: float = 10.0
    phase: AgentPhase = AgentPhase.ANNOUNCING
    aggregator: Presence | None = None
    hellos: int = 0  # since the last reset of the backoff
    hellos_total: int = 0
    next_hello: float = 0.0
    next_status: float | None = None  # None: one interval after the first tick
    refusal: str | None = None
    rejoining: bool = False  # set up, but a new aggregator epoch has not answered yet

    @property
    def done(self) -> bool:
        return self.phase in (AgentPhase.FINISHED, AgentPhase.REFUSED)

    @property
    def announcing(self) -> bool:
        """Saying hello until the aggregator answers (first join, or a new epoch's)."""
        return self.phase == AgentPhase.ANNOUNCING or (self.rejoining and not self.done)

    def wake_at(self) -> float:
        """When ``tick`` has something to do next."""
        status = self.next_status if self.next_status is not None else 0.0
        return min(status, self.next_hello) if self.announcing else status

    # -- transitions ------------------------------------------------------------------------------

    def tick(self, now: float) -> tuple[Lifecycle, list[Action]]:
        state, actions = self, list[Action]()
        if state.next_status is None:
            state = replace(state, next_status=now + state.status_interval_s)
        if state.announcing and now >= state.next_hello:
            state = state._hello_said(now)
            actions.append(SayHello())
        assert state.next_status is not None
        if now >= state.next_status:
            state = replace(state, next_status=now + state.status_interval_s)
            text = state.waiting_for()
            if text:
                actions.append(Report(text))
        return state, actions

    def saw_aggregator(self, presence: Presence, now: float) -> tuple[Lifecycle, list[Action]]:
        """The aggregator's presence: a new epoch means it restarted and must hear from us."""
        if presence.role != "aggregator" or presence.state == "probe":
            return self, []
        if presence.state == "offline":
            text = f"{self.site_id}: the aggregator of job {self.job_id} went offline"
            gone: list[Action] = [Report(text, warning=True)] if self.aggregator else []
            return replace(self, aggregator=None), gone
        new_epoch = self.aggregator is None or self.aggregator.incarnation != presence.incarnation
        state = replace(self, aggregator=presence)
        if not new_epoch or self.done:
            return state, []
        actions: list[Action] = [
            Report(f"{self.site_id}: online: {presence.describe()}; announcing this site")
        ]
        state = replace(state, hellos=0, next_hello=now)
        if state.phase != AgentPhase.ANNOUNCING:  # rejoin: the setup will be the same job
            state = replace(state._hello_said(now), rejoining=True)
            actions.append(SayHello())
        return state, actions

    def set_up(self) -> Lifecycle:
        """The live aggregator answered hello."""
        phase = AgentPhase.READY if self.phase == AgentPhase.ANNOUNCING else self.phase
        return replace(self, phase=phase, rejoining=False)

    def working(self, phase: AgentPhase) -> Lifecycle:
        return replace(self, phase=phase)

    def idle(self, was: AgentPhase) -> Lifecycle:
        """Back to ready after ``was``, unless a finish or a refusal came meanwhile."""
        return replace(self, phase=AgentPhase.READY) if self.phase == was else self

    def finished(self) -> Lifecycle:
        return replace(self, phase=AgentPhase.FINISHED)

    def refused(self, detail: str) -> Lifecycle:
        return replace(self, phase=AgentPhase.REFUSED, refusal=detail)

    # -- what it says ------------------------------------------------------------------------------

    def waiting_for(self) -> str | None:
        if self.phase == AgentPhase.ANNOUNCING:
            if self.aggregator is None:
                return f"{self.site_id}: waiting for the aggregator of job {self.job_id}: none is online yet"
            return (
                f"{self.site_id}: waiting for the aggregator of job {self.job_id} to answer hello "
                f"({self.aggregator.describe()})"
            )
        if self.phase == AgentPhase.READY:
            return f"{self.site_id}: joined job {self.job_id}; waiting for the aggregator's next request"
        return None

    def _hello_said(self, now: float) -> Lifecycle:
        return replace(
            self,
            hellos=self.hellos + 1,
            hellos_total=self.hellos_total + 1,
            next_hello=now + hello_delay(self.hellos, self.hello_interval_s),
        )
