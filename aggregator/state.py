"""The aggregator's whole position in a job, as one value, and its pure transitions.

``JobState`` is everything the aggregator knows: the phase, the round, the training turn, who
was asked what and who answered, the site registry, the global weights and the finished
rounds. ``JobMachine.step(state, event, now)`` returns the next state and the messages to send;
it performs no I/O and reads no clock (``now`` comes in with every call), so a job can be
driven by a test with a fake clock, and saving a job is saving this value.

Before the first round, a **statistics round** combines every site's count, sums and sums of
squares of its inputs (never values) into the one normalisation every site applies; a job with a
fixed normalisation skips it.

A round is training turns (as many as the strategy asks for: one for parallel rounds, one per
site for cyclic ones) followed by one evaluation, all under **one deadline per round**. A site
that has not answered by the deadline is missed for the round, and a round with fewer than
``min_sites`` trained sites fails the job, whatever the orchestration.

Joining is idempotent. A repeated ``hello`` from the same agent process (same incarnation) is
answered with ``setup`` again and nothing else; a ``hello`` from a restarted agent (new
incarnation) also repeats what that site was asked in the current step, since the old process
took the request with it; a replayed ``hello`` of an earlier incarnation is dropped. Either way
a site trains a turn at most once.

Presence drives the registry: a site whose Last Will says offline is not waited for, as long
as the sites still live can make ``min_sites``; it is waited for again once it is back.

A site cannot claim more weight than it declared: an update whose sample count exceeds
``sample_slack`` x the training samples of the site's first ``hello`` is refused, like any
unusable reply (the site is told, and not waited for). A ``Revoked`` site (its certificate was
revoked) is out for good: not waited for, not asked, not answered, not sent the final model.

Every closed round emits a ``Checkpoint`` carrying a ``ResumePoint``: what a restarted
aggregator needs to go on from the next round exactly as if it had never stopped
(``resumed_state``). After the last round, ``finish`` goes to every site, and the job lingers
until each one acknowledged it (a site that comes back meanwhile gets it again).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from aggregator import alignment
from aggregator.alignment import AlignReplied, Script
from aggregator.strategy import Reply, Strategy, mean_metrics
from medsplit.evaluation import pooled_tallies
from medsplit.modes import TextEnum
from medsplit.protocol import Kind
from medsplit.statistics import FeatureSums, class_weights

Tensors = Mapping[str, torch.Tensor]

TALLY = "tally"  # an evaluation's counts (medsplit.evaluation.Tally), pooled at close


class Phase(TextEnum):
    JOINING = "joining"
    ALIGNING = "aligning"  # vertical jobs: the parties' private set intersection, relayed
    STATISTICS = "statistics"  # the sites' counts and sums, combined into one normalisation
    TRAINING = "training"
    EVALUATING = "evaluating"
    FINISHING = "finishing"  # finish sent; waiting for every site to acknowledge it
    FINISHED = "finished"
    FAILED = "failed"


MAX_PAST_INCARNATIONS = 8  # per site: enough to recognise replays of recent restarts


@dataclass(frozen=True)
class SiteEntry:
    """What the registry knows of one site (also what the status page will show)."""

    site_id: str
    joined: bool = False
    incarnation: str | None = None  # the agent process that last said hello
    connected: bool = False  # from presence (Last Will: offline)
    last_seen: float | None = None
    train_samples: int = 0
    test_samples: int = 0
    bytes_up: int = 0  # running totals as the site reports them
    bytes_down: int = 0
    past_incarnations: tuple[str, ...] = ()  # earlier agent processes: their hellos are replays
    finished: bool = False  # acknowledged its finish
    revoked: bool = False  # its certificate was revoked: out of the job for good

    @property
    def offline(self) -> bool:
        """Joined, then its presence said offline (Last Will or a clean exit)."""
        return self.joined and not self.connected

    @property
    def taking_part(self) -> bool:
        return self.joined and not self.revoked


@dataclass
class RoundRecord:
    """One finished round, as the report shows it."""

    round: int
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_loss: dict[str, float] = field(default_factory=dict)
    compute_seconds: dict[str, float] = field(default_factory=dict)  # each site's own training
    # Split modes: where each site's training time went (compute, exchange, codec, steps).
    site_timings: dict[str, dict[str, float]] = field(default_factory=dict)
    missed: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # this round's traffic
    seconds: float = 0.0
    train_seconds: float = 0.0
    resumed: bool = False  # an aggregator restarted from a checkpoint ran (the rest of) it
    # The pooled test set's metrics, from the sites' tallies added up (medsplit.evaluation).
    pooled: dict[str, float | None] = field(default_factory=dict)

    def mean(self) -> dict[str, float | None]:
        return mean_metrics(self.metrics)


# -- events: what the driver observed ----------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    site: str
    incarnation: str
    train_samples: int
    test_samples: int


@dataclass(frozen=True)
class TrainDone:
    site: str
    round: int
    reply: Reply
    train_loss: float | None  # None: the site's loss was not a finite number
    compute_seconds: float
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluated:
    site: str
    round: int
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class StatsReported:
    site: str
    sums: FeatureSums


@dataclass(frozen=True)
class SitePresence:
    site: str
    online: bool


@dataclass(frozen=True)
class FinishAcked:
    """The site has its final model (it acknowledged ``finish``)."""

    site: str


@dataclass(frozen=True)
class Revoked:
    """The site's certificate was revoked: nothing more is asked of it or taken from it, and it
    does not get the final model."""

    site: str


@dataclass(frozen=True)
class ReplyRejected:
    """A message of ``site`` failed the receiver's checks (its meta, its tensors): if it was
    the answer the current step waits for, the site is refused for the step, not waited for
    until the deadline (the aggregator's repeats of the request would only bring it again)."""

    site: str
    kind: str | None  # None: the site's answer to its current step (its own error reply)
    reason: str  # a short name, counted by (e.g. BadSeal)
    detail: str = ""  # what exactly was wrong, for the site and the log


@dataclass(frozen=True)
class Tick:
    """Time passed (deadlines are checked on every event; a tick is an event with no news)."""


Event = (
    Hello
    | StatsReported
    | TrainDone
    | Evaluated
    | SitePresence
    | FinishAcked
    | Revoked
    | ReplyRejected
    | AlignReplied
    | Tick
)


# -- outgoing messages ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """A message for one site. ``FINISH`` tensors are the driver's (it holds the trunk)."""

    site: str
    kind: Kind
    round: int
    tensors: Tensors = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Forget:
    """The site's unfinished split-learning steps are void (it restarted or missed its turn)."""

    site: str


@dataclass(frozen=True)
class OpenTurn:
    """A training turn starts for ``sites`` (the trunk prepares their server-side state)."""

    sites: tuple[str, ...]


@dataclass(frozen=True)
class CloseTurn:
    """A turn ended; ``samples`` of the sites whose updates count (the trunk merges theirs)."""

    samples: Mapping[str, int]


@dataclass(frozen=True)
class ResumePoint:
    """Everything a restarted aggregator needs to go on from the start of ``round``.

    The trunk and its optimizers are the driver's, saved beside this by the checkpoint store.
    """

    round: int  # the next round to run (== rounds: only finish is left)
    weights: Tensors
    history: tuple[RoundRecord, ...]
    normalization: tuple[torch.Tensor, torch.Tensor] | None
    sites: Mapping[str, SiteEntry]
    late_messages: int = 0
    class_weights: torch.Tensor | None = None  # training.class_weights: balanced
    resumed_at: tuple[int, ...] = ()
    # Mid-round (a step checkpoint of sequential split rounds): the turn in progress, the
    # site's step to go on from, and the round so far.
    turn: int = 0
    step: int = 0
    record: RoundRecord | None = None

    @property
    def name(self) -> str:
        """Its file name: ``round-00003`` between rounds, with turn and step inside one."""
        if self.record is None:
            return f"round-{self.round:05d}"
        return f"round-{self.round:05d}-turn-{self.turn:04d}-step-{self.step:07d}"


@dataclass(frozen=True)
class Checkpoint:
    """Save ``point`` now, before anything of the next round is sent."""

    point: ResumePoint


@dataclass(frozen=True)
class Refusal:
    """``site``'s answer to the current step was refused for ``reason`` (counted by it)."""

    site: str
    reason: str
    detail: str


Out = Send | Forget | OpenTurn | CloseTurn | Checkpoint | Refusal

# Which answer each step waits for: a rejected message of that kind costs the site its step.
ANSWER_OF: dict[str, Phase] = {
    Kind.STATS: Phase.STATISTICS,
    Kind.DONE: Phase.TRAINING,
    Kind.METRICS: Phase.EVALUATING,
    Kind.ALIGNED: Phase.ALIGNING,
}


# -- the state ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobState:
    phase: Phase
    sites: Mapping[str, SiteEntry]
    weights: Tensors  # the global state: what the sites receive each round
    deadline: float  # of joining, then of the current round
    round: int = -1
    turn: int = 0
    asked: tuple[str, ...] = ()  # asked in the current step (turn or evaluation)
    replies: Mapping[str, TrainDone] = field(default_factory=dict)  # this turn
    evaluations: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # this round
    refused: tuple[str, ...] = ()  # asked this step, but their reply was refused
    record: RoundRecord | None = None  # the round in progress
    round_started: float = 0.0
    history: tuple[RoundRecord, ...] = ()
    late_messages: int = 0
    failure: str | None = None
    statistics: Mapping[str, FeatureSums] = field(default_factory=dict)
    normalization: tuple[torch.Tensor, torch.Tensor] | None = None  # mean, std for every site
    class_weights: torch.Tensor | None = None  # the loss's per class, with the normalization
    resume: ResumePoint | None = None  # resumed from a checkpoint: where to go on from
    resumed_at: tuple[int, ...] = ()  # rounds at which this job was resumed, for the report
    from_step: int = 0  # the current turn's site goes on from this step (a mid-round resume)
    # Vertical jobs' alignment (aggregator.alignment): the stage, its answers so far, the
    # bytes carried to the next stage, and the last set size said (at the end: the patients
    # every party holds).
    align_stage: int = 0
    aligned: Mapping[str, AlignReplied] = field(default_factory=dict)
    align_carry: Tensors = field(default_factory=dict)
    align_size: int | None = None

    @property
    def joined(self) -> list[str]:
        """Joined and not revoked: the sites the job asks things of."""
        return [s for s, e in self.sites.items() if e.taking_part]

    @property
    def live(self) -> list[str]:
        """Joined and not known to be offline."""
        return [s for s, e in self.sites.items() if e.taking_part and e.connected]

    @property
    def waiting_for(self) -> list[str]:
        """Whom the job waits for now, in the job's order."""
        if self.phase == Phase.JOINING:  # (after a resume, sites that have finished need not)
            return [
                s
                for s, e in self.sites.items()
                if not e.joined and not e.finished and not e.revoked
            ]
        asked = [s for s in self.asked if not self.sites[s].revoked]
        if self.phase == Phase.FINISHING:
            return [s for s in asked if not self.sites[s].finished]
        answered = set(self.refused) | set(
            {
                Phase.STATISTICS: self.statistics,
                Phase.ALIGNING: self.aligned,
                Phase.TRAINING: self.replies,
                Phase.EVALUATING: self.evaluations,
            }.get(self.phase, {})
        )
        return [s for s in asked if s not in answered]

    def step_point(self, step: int) -> ResumePoint:
        """This job inside a sequential split turn, its site about to send ``step``."""
        return replace(
            self.resume_point(), round=self.round, turn=self.turn, step=step, record=self.record
        )

    def resume_point(self) -> ResumePoint:
        """This job between rounds, as a checkpoint keeps it."""
        return ResumePoint(
            round=self.round + 1 if self.record is None else self.round,
            weights=self.weights,
            history=self.history,
            normalization=self.normalization,
            sites=self.sites,
            late_messages=self.late_messages,
            resumed_at=self.resumed_at,
            class_weights=self.class_weights,
        )

    @property
    def done(self) -> bool:
        return self.phase in (Phase.FINISHED, Phase.FAILED)


def initial_state(
    sites: list[str], weights: Tensors, now: float, join_deadline_s: float
) -> JobState:
    return JobState(
        Phase.JOINING,
        {s: SiteEntry(s) for s in sites},
        dict(weights),
        deadline=now + join_deadline_s,
    )


def resumed_state(
    point: ResumePoint, sites: list[str], now: float, join_deadline_s: float
) -> JobState:
    """A restarted aggregator's state: joining again (the sites must hear of the new epoch),
    then on from ``point.round``, with everything the finished rounds left behind."""
    # Everyone must join again; what is known of them (incarnations -- the same agent process
    # may simply say hello again --, samples, traffic, who has the final model) is kept.
    entries = {
        site: replace(
            point.sites.get(site, SiteEntry(site)), joined=False, connected=False, last_seen=None
        )
        for site in sites
    }
    previous = point.history[-1].round if point.history else -1
    return JobState(
        Phase.JOINING,
        entries,
        dict(point.weights),
        deadline=now + join_deadline_s,
        round=previous,
        history=point.history,
        late_messages=point.late_messages,
        normalization=point.normalization,
        class_weights=point.class_weights,
        resume=point,
        resumed_at=(*point.resumed_at, point.round),
    )


@dataclass(frozen=True)
class JobMachine:
    """The rules of one job: its strategy and limits. ``step`` is the only entry point."""

    strategy: Strategy
    rounds: int
    quorum: int
    round_deadline_s: float
    local_epochs: int
    # None: run the statistics round; otherwise the fixed (mean, std) of the job, or () for none.
    normalization: tuple[torch.Tensor, torch.Tensor] | tuple[()] | None = None
    # The statistics round also weighs the classes (training.class_weights: balanced).
    class_weights: bool = False
    multilabel: bool = False
    finish_linger_s: float = 0.0  # how long to wait for every site to acknowledge finish
    snapshot_every: int = 0  # sequential split: sites keep their state every this many steps
    sample_slack: float = 1.0  # a reply may claim this many times the samples declared at join
    # Sealed jobs: the sites a seal goes to (the job's, less the revoked); empty when unsealed.
    recipients: tuple[str, ...] = ()
    # Vertical jobs: the stages of the parties' alignment, run before anything else.
    alignment: Script = ()
    # Vertical jobs: the parties step together, so one restarting restarts the round for all.
    lockstep: bool = False

    def step(self, state: JobState, event: Event, now: float) -> tuple[JobState, list[Out]]:
        if state.done:
            return state, []
        out: list[Out] = []
        site = getattr(event, "site", None)
        if site is not None and site in state.sites and not isinstance(event, Hello):
            state = _with_site(state, replace(state.sites[site], last_seen=now))
        if isinstance(event, Hello):
            state = self._hello(state, event, now, out)
        elif isinstance(event, StatsReported):
            state = self._stats(state, event)
        elif isinstance(event, TrainDone):
            state = self._train_done(state, event, out)
        elif isinstance(event, Evaluated):
            state = self._evaluated(state, event)
        elif isinstance(event, SitePresence):
            state = self._presence(state, event)
        elif isinstance(event, FinishAcked):
            state = _with_site(state, replace(state.sites[event.site], finished=True))
        elif isinstance(event, Revoked):
            state = _with_site(
                state, replace(state.sites[event.site], revoked=True, connected=False)
            )
        elif isinstance(event, ReplyRejected):
            state = self._rejected(state, event, out)
        elif isinstance(event, AlignReplied):
            state = alignment.replied(state, event)
        state = self._advance(state, now, out)
        return state, out

    # -- events ----------------------------------------------------------------------------------

    def _hello(self, state: JobState, hello: Hello, now: float, out: list[Out]) -> JobState:
        entry = state.sites[hello.site]
        if entry.revoked:
            return state
        if hello.incarnation in entry.past_incarnations:  # a replay of an old process's hello
            return replace(state, late_messages=state.late_messages + 1)
        restarted = entry.incarnation is not None and entry.incarnation != hello.incarnation
        past = entry.past_incarnations
        if restarted:
            assert entry.incarnation is not None
            past = (*past, entry.incarnation)[-MAX_PAST_INCARNATIONS:]
        state = _with_site(
            state,
            replace(
                entry,
                joined=True,
                connected=True,
                incarnation=hello.incarnation,
                past_incarnations=past,
                last_seen=now,
                # What a site declared when it first joined bounds what it may claim later: a
                # hello again (or a restart) cannot raise it.
                train_samples=entry.train_samples or hello.train_samples,
                test_samples=entry.test_samples or hello.test_samples,
            ),
        )
        out.append(Send(hello.site, Kind.SETUP, max(state.round, 0)))
        if state.normalization is not None and state.phase != Phase.JOINING:  # joined late
            out.append(self._normalization(state, hello.site))
        if restarted and self.lockstep and state.phase in (Phase.TRAINING, Phase.EVALUATING):
            return self._start_over(state, out)
        if (restarted or state.phase == Phase.FINISHING) and hello.site in state.waiting_for:
            out.append(Forget(hello.site))
            out.append(self._request(state, hello.site))
        return state

    def _start_over(self, state: JobState, out: list[Out]) -> JobState:
        """Parties in lockstep (vertical) cannot go on without one that restarted, nor can
        one that had finished the round redo it alone: the round (or its evaluation) starts
        over for every party, each from its own snapshot of the round's start."""
        state = replace(state, replies={}, evaluations={})
        again = state.waiting_for
        out.extend(Forget(site) for site in again)  # nothing of the given-up attempt stays
        out.extend(self._request(state, site) for site in again)
        return state

    def _stats(self, state: JobState, stats: StatsReported) -> JobState:
        if state.phase != Phase.STATISTICS or stats.site not in state.waiting_for:
            return replace(state, late_messages=state.late_messages + 1)
        return replace(state, statistics={**state.statistics, stats.site: stats.sums})

    def _claims_too_much(self, state: JobState, site: str, samples: int) -> str | None:
        """Why ``samples`` is more than ``site`` may claim, or None."""
        declared = state.sites[site].train_samples
        if samples > declared * self.sample_slack:
            return (
                f"site {site} claims {samples} samples but declared {declared} when it joined "
                f"(sample_slack {self.sample_slack:g}); refused"
            )
        return None

    def _refuse(
        self, state: JobState, site: str, reason: str, why: str, out: list[Out]
    ) -> JobState:
        """The site's answer is not used; it is told why, and not waited for this step."""
        out.append(
            Send(
                site,
                Kind.ERROR,
                max(state.round, 0),
                meta={"error": "ReplyRefused", "detail": why[:500]},
            )
        )
        out.append(Refusal(site, reason, why))
        return replace(state, refused=(*state.refused, site))

    def _rejected(self, state: JobState, rejected: ReplyRejected, out: list[Out]) -> JobState:
        of_this_step = rejected.kind is None or ANSWER_OF.get(rejected.kind) == state.phase
        if not of_this_step or rejected.site not in state.waiting_for:
            return state  # not what the step waits for: counted by the receiver, nothing more
        if state.phase == Phase.ALIGNING:  # every party is needed: the job cannot start
            detail = rejected.detail or rejected.reason
            return _failed(state, f"{rejected.site} could not be aligned: {detail}")
        what = rejected.kind or "answer"
        reason = f"{rejected.reason}: {rejected.detail}" if rejected.detail else rejected.reason
        why = f"your {what} was rejected ({reason}); this step goes on without it"
        return self._refuse(state, rejected.site, rejected.reason, why, out)

    def _train_done(self, state: JobState, done: TrainDone, out: list[Out]) -> JobState:
        if (
            state.phase != Phase.TRAINING
            or done.round != state.round
            or done.site not in state.waiting_for
        ):
            return replace(state, late_messages=state.late_messages + 1)
        refusal = self._claims_too_much(state, done.site, done.reply.samples)
        if refusal is not None:
            return self._refuse(state, done.site, "ClaimsTooManySamples", refusal, out)
        try:
            self.strategy.check_reply(state.weights, done.reply)
        except ValueError as exc:
            return self._refuse(state, done.site, "UnusableReply", str(exc), out)
        return replace(state, replies={**state.replies, done.site: done})

    def _evaluated(self, state: JobState, evaluated: Evaluated) -> JobState:
        if (
            state.phase != Phase.EVALUATING
            or evaluated.round != state.round
            or evaluated.site not in state.waiting_for
        ):
            return replace(state, late_messages=state.late_messages + 1)
        return replace(state, evaluations={**state.evaluations, evaluated.site: evaluated.metrics})

    def _presence(self, state: JobState, presence: SitePresence) -> JobState:
        return _with_site(state, replace(state.sites[presence.site], connected=presence.online))

    def _outstanding(self, state: JobState) -> list[str]:
        """Whom the current step still waits for: offline sites are skipped while the live
        ones can make ``min_sites`` (a site that went away will not answer, but one that is
        needed for the quorum may come back before the deadline)."""
        waiting = state.waiting_for
        if state.phase in (Phase.JOINING, Phase.FINISHING) or len(state.live) < self.quorum:
            return waiting  # finish waits for everyone: a site that comes back still gets it
        return [s for s in waiting if not state.sites[s].offline]

    # -- progress ----------------------------------------------------------------------------------

    def _advance(self, state: JobState, now: float, out: list[Out]) -> JobState:
        """Move on as far as the replies and the clock allow."""
        while not state.done:
            if state.phase == Phase.JOINING:
                if state.waiting_for and now < state.deadline:
                    return state
                only_finish = state.resume is not None and state.resume.round == self.rounds
                if len(state.joined) < self.quorum and not only_finish:
                    return _failed(
                        state,
                        f"only {len(state.joined)} of {len(state.sites)} sites joined before the "
                        f"join deadline (min_sites={self.quorum}); missing "
                        f"{', '.join(state.waiting_for)}",
                    )
                state = self._after_joining(state, now, out)
            elif self._outstanding(state) and now < state.deadline:
                return state
            elif state.phase == Phase.FINISHING:  # saved again: who has the final model
                state = replace(state, phase=Phase.FINISHED, asked=())
                out.append(Checkpoint(state.resume_point()))
            elif state.phase == Phase.STATISTICS:
                state = self._close_statistics(state, now, out)
            elif state.phase == Phase.ALIGNING:
                state = self._close_alignment_stage(state, now, out)
            elif state.phase == Phase.TRAINING:
                state = self._close_turn(state, now, out)
            else:
                state = self._close_round(state, now, out)
        return state

    def _after_joining(self, state: JobState, now: float, out: list[Out]) -> JobState:
        """A vertical job aligns its parties first -- every time it starts, resumed or not:
        what the parties hold may have changed, and no alignment is kept by the aggregator."""
        if not self.alignment:
            return self._start_statistics(state, now, out)
        return self._start_alignment_stage(state, 0, now, out)

    def _start_alignment_stage(
        self, state: JobState, stage: int, now: float, out: list[Out]
    ) -> JobState:
        state = alignment.start_stage(state, self.alignment, stage, now, self.round_deadline_s)
        out.extend(self._request(state, site) for site in state.asked)
        return state

    def _close_alignment_stage(self, state: JobState, now: float, out: list[Out]) -> JobState:
        state, failure = alignment.close_stage(state)
        if failure is not None:
            return _failed(state, failure)
        if state.align_stage + 1 < len(self.alignment):
            return self._start_alignment_stage(state, state.align_stage + 1, now, out)
        state = replace(state, align_carry={})  # aligned: the bytes have served
        return self._start_statistics(state, now, out)

    def _start_statistics(self, state: JobState, now: float, out: list[Out]) -> JobState:
        """Before training: combine every site's sums into one normalisation, or use the job's.

        A resumed job has its statistics from the checkpoint: it goes on where it stopped.
        """
        if state.resume is not None:
            point, state = state.resume, replace(state, resume=None)
            if state.normalization is not None:
                out.extend(self._normalization(state, site) for site in state.joined)
            if point.record is not None:  # inside a round
                return self._resume_turn(state, point, now, out)
            return self._start_round(state, point.round, now, out, resumed=True)
        if self.normalization is None:
            state = replace(
                state,
                phase=Phase.STATISTICS,
                asked=tuple(state.joined),
                deadline=now + self.round_deadline_s,
            )
            out.extend(self._request(state, site) for site in state.asked)
            return state
        if self.normalization:  # fixed in the job: no round needed
            state = replace(state, normalization=self.normalization)
            out.extend(self._normalization(state, site) for site in state.joined)
        return self._start_round(state, 0, now, out)

    def _close_statistics(self, state: JobState, now: float, out: list[Out]) -> JobState:
        if len(state.statistics) < self.quorum:
            return _failed(
                state,
                f"only {len(state.statistics)} sites sent their statistics before the deadline "
                f"(min_sites={self.quorum}); missing {', '.join(state.waiting_for)}",
            )
        reported = [state.statistics[s] for s in state.asked if s in state.statistics]
        mean, std = FeatureSums.combine(reported)
        weights = None
        if self.class_weights:
            counts = [r.classes for r in reported if r.classes is not None]
            records = sum(r.records or 0 for r in reported)
            try:
                weights = class_weights(counts, records, self.multilabel)
            except ValueError as exc:
                return _failed(state, f"the statistics round's {exc}")
        state = replace(state, normalization=(mean, std), class_weights=weights, asked=())
        out.extend(self._normalization(state, site) for site in state.joined)
        return self._start_round(state, 0, now, out)

    def _normalization(self, state: JobState, site: str) -> Send:
        assert state.normalization is not None
        mean, std = state.normalization
        tensors = {"mean": mean, "std": std}
        if state.class_weights is not None:
            tensors["class_weights"] = state.class_weights
        return Send(site, Kind.NORMALIZATION, 0, tensors)

    def _start_round(
        self, state: JobState, round: int, now: float, out: list[Out], *, resumed: bool = False
    ) -> JobState:
        if round >= self.rounds:
            return self._finish(state, now, out)
        if len(state.joined) < self.quorum:
            return _failed(
                state,
                f"round {round}: only {len(state.joined)} sites present (min_sites={self.quorum})",
            )
        state = replace(
            state,
            phase=Phase.TRAINING,
            round=round,
            turn=0,
            deadline=now + self.round_deadline_s,
            round_started=now,
            evaluations={},
            record=RoundRecord(round, resumed=resumed),
        )
        return self._start_turn(state, now, out)

    def _resume_turn(
        self, state: JobState, point: ResumePoint, now: float, out: list[Out]
    ) -> JobState:
        """Inside a round: the turn in progress again, its site going on from ``point.step``."""
        assert point.record is not None
        state = replace(
            state,
            phase=Phase.TRAINING,
            round=point.round,
            turn=point.turn,
            deadline=now + self.round_deadline_s,
            round_started=now,
            evaluations={},
            record=replace(point.record, resumed=True),
            from_step=point.step,
        )
        return self._start_turn(state, now, out)

    def _start_turn(self, state: JobState, now: float, out: list[Out]) -> JobState:
        sites = self.strategy.configure_train(state.round, state.turn, state.joined)
        if not sites:
            return self._start_evaluation(state, now, out)
        state = replace(state, asked=tuple(sites), replies={}, refused=())
        out.append(OpenTurn(tuple(sites)))
        out.extend(self._request(state, site) for site in sites)
        return state

    def _close_turn(self, state: JobState, now: float, out: list[Out]) -> JobState:
        assert state.record is not None
        missed = state.waiting_for
        out.extend(Forget(site) for site in missed)
        replies = [state.replies[s] for s in state.asked if s in state.replies]
        failures = [s for s in state.asked if s not in state.replies]
        weights = self.strategy.aggregate_train(state.weights, [r.reply for r in replies], failures)
        out.append(CloseTurn({r.site: r.reply.samples for r in replies}))
        record = replace(
            state.record,
            trained=[*state.record.trained, *(r.site for r in replies)],
            missed=[*state.record.missed, *failures],
            train_loss={
                **state.record.train_loss,
                **{r.site: r.train_loss for r in replies if r.train_loss is not None},
            },
            compute_seconds={
                **state.record.compute_seconds,
                **{r.site: r.compute_seconds for r in replies},
            },
            site_timings={
                **state.record.site_timings,
                **{r.site: dict(r.timings) for r in replies if r.timings},
            },
        )
        state = replace(
            state, weights=weights, record=record, turn=state.turn + 1, asked=(), from_step=0
        )
        if now >= state.deadline:  # the round's time is up: no more turns
            unasked = self._remaining_turns(state)
            record = replace(record, missed=[*record.missed, *unasked])
            return self._start_evaluation(replace(state, record=record), now, out)
        return self._start_turn(state, now, out)

    def _remaining_turns(self, state: JobState) -> list[str]:
        """The sites the strategy would still have asked this round, in order."""
        sites, turn = [], state.turn
        while chosen := self.strategy.configure_train(state.round, turn, state.joined):
            sites += chosen
            turn += 1
        return sites

    def _start_evaluation(self, state: JobState, now: float, out: list[Out]) -> JobState:
        assert state.record is not None
        if len(state.record.trained) < self.quorum:
            return _failed(
                state,
                f"round {state.round}: only {len(state.record.trained)} sites trained before the "
                f"deadline (min_sites={self.quorum}); missed {', '.join(state.record.missed)}",
            )
        record = replace(state.record, train_seconds=now - state.round_started)
        sites = self.strategy.configure_evaluate(state.round, state.joined)
        state = replace(
            state, phase=Phase.EVALUATING, asked=tuple(sites), refused=(), record=record
        )
        out.extend(self._request(state, site) for site in sites)
        return state

    def _close_round(self, state: JobState, now: float, out: list[Out]) -> JobState:
        assert state.record is not None
        sites = dict(state.sites)
        traffic: dict[str, dict[str, int]] = {}
        for site, metrics in state.evaluations.items():
            # Sites report running totals; a round's traffic is the growth since the last one.
            up, down = int(metrics.get("bytes_up") or 0), int(metrics.get("bytes_down") or 0)
            entry = sites[site]
            if up < entry.bytes_up or down < entry.bytes_down:  # the agent restarted: new totals
                entry = replace(entry, bytes_up=0, bytes_down=0)
            traffic[site] = {"up": up - entry.bytes_up, "down": down - entry.bytes_down}
            sites[site] = replace(entry, bytes_up=up, bytes_down=down)
        record = replace(
            state.record,
            metrics={
                s: {k: v for k, v in m.items() if k != TALLY} for s, m in state.evaluations.items()
            },
            pooled=pooled_tallies([m[TALLY] for m in state.evaluations.values() if TALLY in m]),
            bytes=traffic,
            seconds=now - state.round_started,
        )
        state = replace(state, sites=sites, history=(*state.history, record), record=None)
        out.append(Checkpoint(state.resume_point()))
        return self._start_round(state, state.round + 1, now, out)

    def _finish(self, state: JobState, now: float, out: list[Out]) -> JobState:
        """Every site gets its final weights; the job waits a while for their receipts."""
        unfinished = [s for s, e in state.sites.items() if e.joined or not e.finished]
        state = replace(
            state,
            phase=Phase.FINISHING,
            asked=tuple(unfinished),
            deadline=now + self.finish_linger_s,
        )
        out.extend(self._request(state, site) for site in state.waiting_for)
        return state

    def _request(self, state: JobState, site: str) -> Send:
        """What ``site`` is asked in the current step: its statistics, or to train or evaluate."""
        if state.phase == Phase.STATISTICS:
            return Send(site, Kind.STATS_REQUEST, 0)
        if state.phase == Phase.ALIGNING:
            return alignment.stage_request(state, self.alignment, site)
        if state.phase == Phase.FINISHING:
            return Send(site, Kind.FINISH, self.rounds)
        if state.phase == Phase.EVALUATING:
            return Send(site, Kind.EVALUATE, state.round, state.weights)
        meta: dict[str, Any] = {"epochs": self.local_epochs}
        if self.snapshot_every:
            meta["snapshot_every"] = self.snapshot_every
        if state.from_step:
            meta["from_step"] = state.from_step
        if self.recipients:  # a sealed job: the site seals its turn to these sites
            meta["turn"] = state.turn
            meta["recipients"] = ",".join(
                s for s in self.recipients if s not in state.sites or not state.sites[s].revoked
            )
        return Send(site, Kind.TRAIN, state.round, state.weights, meta)


def _with_site(state: JobState, entry: SiteEntry) -> JobState:
    return replace(state, sites={**state.sites, entry.site_id: entry})


def _failed(state: JobState, why: str) -> JobState:
    return replace(state, phase=Phase.FAILED, failure=why, asked=())
