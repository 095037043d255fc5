"""The driver of a job: a thin loop that feeds the channel's messages to ``JobMachine``.

Everything that decides anything lives in ``aggregator.state`` (pure transitions over
``JobState``). This loop only translates: uplink envelopes and presence into events, the
machine's outgoing messages into envelopes, and the clock into ``Tick`` events. Cut-layer
traffic of split learning (``activations``, ``trunk-grad``, ``eval-activations``) is a service,
not a state change: it is answered at once through the ``Trunk``.

It never waits silently: while a step is open it logs, every ``waits.status_interval_s``, whom it
waits for and how long the round has left.

What keeps a job going through faults lives here too, since it is about messages, not rules:

* every request (``train``, ``evaluate``, ``stats-request``, ``finish``) not answered within
  ``waits.retry_interval_s`` is published again with the *same* message id, at doubling
  intervals: the site answers a request once, and re-sends its answer to a repeat;
* cut-layer answers go out through ``Endpoint.answer``, which keeps them: a repeated request
  (its answer was lost) gets the same answer again instead of a second update of the trunk;
* an answer counts only if it correlates (``reply_to``) with this aggregator's open request to
  that site: replays from earlier rounds, earlier epochs or earlier runs are dropped and counted;
* every downlink message carries the aggregator's epoch, so sites drop an older epoch's;
* each ``Checkpoint`` the machine emits is written (``aggregator.checkpoint``) before anything
  of the next round is sent, and a coordinator built over a checkpoint directory resumes from
  its newest valid checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from aggregator.alignment import AlignReplied
from aggregator.checkpoint import CheckpointStore
from aggregator.conduct import Conduct
from aggregator.config import JobConfig
from aggregator.observability import CUT_LAYER_KINDS, StepTimes
from aggregator.requests import OpenRequests
from aggregator.sealed_relay import SealedRelay, no_seals, seal_refusal
from aggregator.state import (
    TALLY,
    Checkpoint,
    CloseTurn,
    Evaluated,
    Event,
    FinishAcked,
    Forget,
    Hello,
    JobMachine,
    JobState,
    OpenTurn,
    Out,
    Phase,
    Refusal,
    ReplyRejected,
    Revoked,
    RoundRecord,
    SiteEntry,
    SitePresence,
    StatsReported,
    Tick,
    TrainDone,
    initial_state,
    resumed_state,
)
from aggregator.strategy import Cyclic, FedAvg, Flop, Reply, Strategy, Together
from aggregator.trunk import Trunk
from aggregator.trunk_service import Answer, TrunkService
from aggregator.vertical import vertical_trunk
from aggregator.wire_tap import WireTap
from medsplit.aggregation import Aggregation
from medsplit.channel import Endpoint, Received
from medsplit.evaluation import Tally
from medsplit.ids import AGGREGATOR_ID
from medsplit.modes import MODES, Mode, Orchestration, labels_travel
from medsplit.protocol import (
    JobSpec,
    Kind,
    TensorSpecs,
    edge_keys,
    exchanged_keys,
    final_keys,
    topics,
)
from medsplit.protocol.meta import (
    AlignedMeta,
    DoneMeta,
    ErrorMeta,
    HelloMeta,
    MessageRules,
    MetricsMeta,
    StatsMeta,
    StepMeta,
    read_meta,
)
from medsplit.protocol.presence import Presence
from medsplit.protocol.spec import SEALS, segments_sealed
from medsplit.security.revocation import RevocationWatch
from medsplit.security.seal import Roster
from medsplit.snapshots import set_rng_states
from medsplit.statistics import FeatureSums, normalization_digest
from medsplit.throttle import error_replies
from medsplit.transport.inbox import branch
from medsplit.wire import Envelope, ReassemblyOverflow, ReassemblyTimeout, WireError
from models import split_model

log = logging.getLogger(__name__)
EventSink = Callable[[dict[str, Any]], None]
REFUSAL_INTERVAL_S = 10.0  # a stranger repeating hello is refused at most this often
MAX_REMEMBERED_STRANGERS = 1024
LOST_IN_TRANSIT = (ReassemblyTimeout, ReassemblyOverflow)
REQUEST_KINDS = frozenset({Kind.STATS_REQUEST, Kind.ALIGN, Kind.TRAIN, Kind.EVALUATE, Kind.FINISH})

__all__ = ["Coordinator", "JobFailed", "JobInterrupted", "RoundRecord", "make_strategy"]


class JobFailed(RuntimeError):
    """Too few sites joined or answered to go on, or another aggregator owns the job."""


class JobInterrupted(RuntimeError):
    """``stop()`` was called (SIGTERM): the job is saved up to its last closed round."""


class Coordinator:
    def __init__(
        self,
        config: JobConfig,
        endpoint: Endpoint,
        *,
        device: torch.device | None = None,
        on_event: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        presence: Presence | None = None,
        checkpoints: CheckpointStore | None = None,
        fresh: bool = False,
        tap: WireTap | None = None,
        roster: Roster | None = None,
    ) -> None:
        """``tap`` keeps what sites send, for the privacy sweep's attacks (never in a deployment).
        ``roster``: the sites' public sealing keys, needed when the job seals segments."""
        self.config = config
        self.sealed = segments_sealed(config.mode, config.seal_segments)
        if self.sealed and roster is None:
            raise ValueError(
                f"job {config.job_id} seals segments (seal_segments) but no roster was given"
            )
        self.roster = roster if self.sealed else None
        self.tap = tap
        self.endpoint = endpoint
        self.on_event = on_event or (lambda event: None)
        self.clock = clock
        self.presence = presence
        plan = config.plan
        model = plan.model.build(seed=config.seed)
        self.trunk = _trunk(config, model, device or torch.device("cpu"))
        self.trunk_service = (
            None
            if self.trunk is None
            else TrunkService(
                self.trunk,
                labels_travel=labels_travel(config.mode, plan.u_shaped),
                micro_batches=config.training.micro_batches,
            )
        )
        # A vertical job's parties step together: their answers wait for each other.
        self.vertical = None if self.trunk is None else vertical_trunk(config, self.trunk)
        script = () if self.vertical is None else self.vertical.alignment()
        full_state = model.state_dict()
        weights = {k: full_state[k].detach().clone() for k in exchanged_keys(plan, config.mode)}
        strategy = make_strategy(config)
        if self.sealed:  # the sites' segments never reach this process: it relays their seals
            weights, strategy = no_seals(), SealedRelay(strategy)
        self.machine = JobMachine(
            strategy,
            rounds=config.rounds.count,
            quorum=config.quorum,
            round_deadline_s=config.rounds.deadline_s,
            local_epochs=config.training.local_epochs,
            normalization=_fixed_normalization(config),
            class_weights=config.training.class_weights == "balanced",
            multilabel=config.training.multilabel,
            finish_linger_s=config.rounds.finish_deadline_s,
            snapshot_every=config.checkpoint.every_steps,
            sample_slack=config.security.sample_slack,
            recipients=tuple(config.sites) if self.sealed else (),
            alignment=script,
            lockstep=self.vertical is not None,
        )
        self.checkpoints = checkpoints
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self.state: JobState = initial_state(
            list(config.sites), weights, clock(), config.rounds.join_deadline_s
        )
        if checkpoints is not None and not fresh:
            self._resume(checkpoints)
        self.spec = JobSpec(
            job_id=config.job_id,
            mode=config.mode,
            orchestration=config.orchestration,
            plan=plan,
            rounds=config.rounds.count,
            local_epochs=config.training.local_epochs,
            batch_size=config.training.batch_size,
            micro_batches=config.training.micro_batches,
            optimizer=config.training.optimizer,
            seed=config.seed,
            wire_dtype=config.training.wire_dtype,
            release_trunk=config.release_trunk,
            defenses=config.defenses,
            sealed=self.sealed,
            aggregation=config.aggregation,
            precision=config.training.precision,
            deterministic=config.training.deterministic,
            threshold=config.training.threshold,
            class_weights=config.training.class_weights,
            multilabel=config.training.multilabel,
            standardise_columns=config.mode == Mode.VERTICAL
            and config.normalization == "federated",
        )
        specs = TensorSpecs(
            plan,
            config.mode,
            release_trunk=config.release_trunk,
            sealed=self.sealed,
            class_weights=config.training.class_weights == "balanced",
            multilabel=config.training.multilabel,
        )
        endpoint.set_expected(
            lambda header: specs.expected(header.kind, header.site),
            MessageRules.aggregator(config.mode, plan.u_shaped),
        )
        endpoint.set_reassembly_timeout(config.waits.reassembly_timeout_s)
        endpoint.refuse_retained = True
        endpoint.on_reject = self._on_reject
        endpoint.on_presence = self._on_presence
        self._refused_at: dict[str, float] = {}
        self._rival: Presence | None = None
        self.requests = OpenRequests(config.waits.retry_interval_s, clock)
        self._stop = threading.Event()
        self.step_times = StepTimes()  # split steps, for /metrics
        self.resent = 0  # requests published again because no answer came in time
        self.error_replies = error_replies(clock)  # a flood of bad frames gets a few answers
        self.conduct = Conduct(clock)  # refusals, dropped events, hello rate: the sites'
        revocations = config.security.revocations_file
        self.revocations = (
            None
            if revocations is None
            else RevocationWatch(revocations, config.security.check_interval_s, clock)
        )

    def _resume(self, store: CheckpointStore) -> None:
        loaded = store.newest(self.config)
        if loaded is None:
            return
        self.state = resumed_state(
            loaded.point, list(self.config.sites), self.clock(), self.config.rounds.join_deadline_s
        )
        if self.trunk is not None:
            self.trunk.load_state(loaded.trunk_tensors, loaded.trunk_document)
        set_rng_states(loaded.rng)
        self.resumed_from = self.last_checkpoint = loaded.path
        log.info(
            "resuming job %s from %s: %d of %d rounds done; waiting for the sites to rejoin",
            self.config.job_id,
            loaded.path,
            loaded.point.round,
            self.config.rounds.count,
        )

    @property
    def epoch(self) -> str:
        """This aggregator's incarnation, stamped on every downlink message."""
        return self.presence.incarnation if self.presence is not None else "-"

    # -- what the report and the tests read ---------------------------------------------------------

    @property
    def history(self) -> list[RoundRecord]:
        return list(self.state.history)

    @property
    def sites(self) -> dict[str, SiteEntry]:
        return dict(self.state.sites)

    @property
    def late_messages(self) -> int:
        return self.state.late_messages

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state.weights)

    # -- the loop ---------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run`` (another thread, or a signal handler) to return soon with
        ``JobInterrupted``; the last closed round is already checkpointed."""
        self._stop.set()

    def run(self) -> list[RoundRecord]:
        """Drive the job to its end; raises ``JobFailed`` when it cannot finish."""
        self._check_revocations()
        self._step(Tick())
        next_status = self.clock() + self.config.waits.status_interval_s
        while not self.state.done:
            self._check_revocations()
            if self._rival is not None:
                raise JobFailed(
                    f"job {self.config.job_id} is already coordinated by {self._rival.describe()}"
                )
            if self._stop.is_set():
                raise JobInterrupted(
                    f"job {self.config.job_id} stopped in round {self.state.round + 1}; "
                    f"{len(self.state.history)} rounds are saved"
                )
            now = self.clock()
            if now >= next_status:
                self._log_waiting(now)
                next_status = now + self.config.waits.status_interval_s
            self._resend_due()
            timeout = max(0.0, min(0.5, self.state.deadline - now, next_status - now))
            received = self.endpoint.receive(timeout=timeout)
            if received is not None:
                self.handle(received)
            self._step(Tick())
        self.endpoint.flush()
        if self.state.phase == Phase.FAILED:
            raise JobFailed(self.state.failure or "the job failed")
        return self.history

    def _check_revocations(self) -> None:
        """Refuse, from now on, every site the revocations file names (docs/security.md)."""
        if self.revocations is None:
            return
        for site in sorted(self.revocations.poll()):
            entry = self.state.sites.get(site)
            if entry is not None and not entry.revoked:
                log.warning(
                    "the certificate of %s was revoked: its messages are refused from now on, "
                    "and it gets nothing more of this job",
                    site,
                )
                self.on_event({"event": "revoked", "site": site})
                self._step(Revoked(site))

    def _step(self, event: Event) -> None:
        """Feed one event to the machine. A transition that raises is a bug, but one event
        must not end the job: the event is dropped (the state stays as it was), counted and
        logged with its site, and the job goes on."""
        before = self.state
        try:
            self.state, out = self.machine.step(before, event, self.clock())
        except Exception as exc:
            self.conduct.dropped(event, getattr(event, "site", None) or "-", exc)
            return
        if self.trunk is not None:  # vanilla split's loss is computed here
            self.trunk.class_weights = self.state.class_weights
        for message in out:
            self._execute(message)
        self._report_progress(before, self.state)

    def _execute(self, message: Out) -> None:
        if isinstance(message, Checkpoint):
            self._save_checkpoint(message)
            return
        if isinstance(message, Refusal):
            self.conduct.refused(message.site, message.reason, message.detail)
            return
        if isinstance(message, Forget | OpenTurn | CloseTurn):
            self._trunk_turns(message)
            return
        meta = dict(message.meta)
        tensors = dict(message.tensors)
        if message.kind == Kind.SETUP:
            meta["spec"] = self.spec.to_meta()
            if self.roster is not None:
                meta["roster"] = self.roster.text
        elif message.kind == Kind.FINISH:
            tensors = self.final_tensors()
        elif message.kind in (Kind.TRAIN, Kind.EVALUATE) and self.state.normalization:
            meta["normalization"] = normalization_digest(
                *self.state.normalization, self.state.class_weights
            )
        envelope = self._envelope(message.kind, message.round, tensors, meta)
        if message.kind in REQUEST_KINDS and not self.requests.open(message.site, envelope):
            return  # the same request went out less than a retry interval ago: it waits
        self._reply(message.site, envelope)

    def _trunk_turns(self, message: Forget | OpenTurn | CloseTurn) -> None:
        if self.trunk is None:
            return
        if isinstance(message, Forget):
            self.trunk.forget(message.site)
            if self.vertical is not None:  # a party's step cannot complete without it
                self.vertical.forget()
        elif isinstance(message, OpenTurn):
            self.trunk.open_turn(message.sites)
            if self.vertical is not None:
                self.vertical.forget()  # a new round: every party starts at its first step
        else:
            self.trunk.close_turn(message.samples)

    def _save_checkpoint(self, message: Checkpoint) -> None:
        if self.checkpoints is None:
            return
        trunk = self.trunk.state() if self.trunk is not None else None
        try:
            self.last_checkpoint = self.checkpoints.save(message.point, self.config, trunk)
        except OSError as exc:  # a full disk must not kill the job: it is only less safe
            log.error("could not write a checkpoint in %s: %s", self.checkpoints.directory, exc)
            return
        log.info("checkpoint written: %s", self.last_checkpoint)

    def _resend_due(self) -> None:
        """Publish each open request whose answer is overdue again (same message id), and each
        re-issued one whose turn came (``aggregator.requests``)."""
        sites = self.state.sites
        due = self.requests.due(self.state.waiting_for, lambda site: sites[site].connected)
        for site, request, repeat in due:
            if repeat:
                log.info(
                    "no answer from %s to %s (round %d) yet; sending it again",
                    site,
                    request.envelope.kind,
                    request.envelope.round + 1,
                )
                self.resent += 1
            if "normalization" in request.envelope.meta:  # it may be what was lost
                self._send_normalization(site)
            self._reply(site, request.envelope)

    def _send_normalization(self, site: str) -> None:
        assert self.state.normalization is not None
        mean, std = self.state.normalization
        self._send(site, Kind.NORMALIZATION, tensors={"mean": mean, "std": std})

    def _answers_request(self, site: str, env: Envelope) -> bool:
        """Whether ``env`` answers the request this aggregator has open with ``site``."""
        if self.requests.answered_by(site, env) is not None:
            return True
        log.info("dropped %s from %s: it answers no open request of this epoch", env.kind, site)
        self.state = replace(self.state, late_messages=self.state.late_messages + 1)
        return False

    # -- receiving ---------------------------------------------------------------------------------------

    def handle(self, received: Received) -> None:
        """Act on one received envelope (``run`` calls this for every message it reads)."""
        env = received.envelope
        try:
            site = topics.parse(received.topic).site
        except ValueError:
            return
        if site is None:
            return
        if site not in self.state.sites:
            self._refuse_stranger(site, env)
            return
        if self.state.sites[site].revoked:
            self.endpoint.stats.rejected["Revoked"] += 1
            return
        if env.kind == Kind.HELLO and not self.conduct.hello_taken(site):
            # Each hello is answered (setup, and a restarted agent's request again): answering
            # a flood of them would multiply what the site sends into what it gets.
            self.endpoint.stats.rejected["RateLimited"] += 1
            self.endpoint.stats.rejected_from[branch(received.topic)] += 1
            return
        handler = self._handlers.get(env.kind)
        if handler is None:  # a kind the job's rules let through but nobody handles
            log.warning("unexpected %s from %s ignored", env.kind, site)
            return
        if self.tap is not None:
            self.tap.received(site, env)
        try:
            started = time.perf_counter()
            handler(self, site, env)
            if env.kind in CUT_LAYER_KINDS:
                self.step_times.served(site, env, started, time.perf_counter())
        except Exception as exc:
            # A message that passed the wire checks but still cannot be used (e.g. a step the
            # trunk cannot process) is answered with an error; it never stops the job.
            log.warning("could not handle %s from %s: %s", env.kind, site, exc)
            if self.error_replies.allow(site):
                self._reply(site, env.error(AGGREGATOR_ID, type(exc).__name__, str(exc)))

    def _on_hello(self, site: str, env: Envelope) -> None:
        first = not self.state.sites[site].joined
        hello = read_meta(HelloMeta, env)
        incarnation = hello.incarnation or env.msg_id
        self._step(Hello(site, incarnation, hello.train_samples, hello.test_samples))
        if first:
            entry = self.state.sites[site]
            log.info(
                "%s joined: %d training samples (%d/%d sites)",
                site,
                entry.train_samples,
                len(self.state.joined),
                len(self.state.sites),
            )
            self.on_event({"event": "joined", "site": site, "train_samples": entry.train_samples})

    def _on_stats(self, site: str, env: Envelope) -> None:
        if not self._answers_request(site, env):
            return
        meta = read_meta(StatsMeta, env)
        classes, records = env.tensors["classes"], meta.records or 0
        if bool((classes < 0).any()) or bool((classes > records).any()):
            detail = f"classes: counts must lie between 0 and the {records} records reported"
            self._step(ReplyRejected(site, Kind.STATS, "UnusableReply", detail))
            return
        sums = FeatureSums(meta.count, env.tensors["sum"], env.tensors["sum_sq"], classes, records)
        self._step(StatsReported(site, sums))

    def _on_done(self, site: str, env: Envelope) -> None:
        if not self._answers_request(site, env):
            return
        done = read_meta(DoneMeta, env)
        refused = None
        if self.roster is not None:
            place = {"round": self.state.round, "turn": self.state.turn, "samples": done.samples}
            refused = seal_refusal(
                env.tensors, self.roster, site=site, job_id=self.config.job_id, **place
            )
        if refused is not None:
            self._step(ReplyRejected(site, Kind.DONE, "BadSeal", refused))
            return
        reply = Reply(site, env.tensors, done.samples)
        self._step(
            TrainDone(site, env.round, reply, done.train_loss, done.train_seconds, _timings(done))
        )

    def _on_metrics(self, site: str, env: Envelope) -> None:
        if not self._answers_request(site, env):
            return
        metrics = read_meta(MetricsMeta, env)
        summary: dict[str, Any] = metrics.model_dump(exclude={"epoch"})
        try:
            summary[TALLY] = Tally.from_tensors(
                dict(env.tensors), metrics.samples, self.config.training.multilabel
            )
        except ValueError as exc:
            self._step(ReplyRejected(site, Kind.METRICS, "UnusableReply", str(exc)))
            return
        self._step(Evaluated(site, env.round, summary))

    def _on_finished(self, site: str, env: Envelope) -> None:
        if not self._answers_request(site, env):
            return
        log.info("%s has its final model", site)
        self._step(FinishAcked(site))

    def _on_error(self, site: str, env: Envelope) -> None:
        self.conduct.say(f"error {site}", "site %s reported an error: %s", site, dict(env.meta))
        if self.requests.answered_by(site, env) is not None:
            # The site cannot answer what it was asked (e.g. its model went non-finite): the
            # step goes on without it instead of waiting for the deadline.
            error = read_meta(ErrorMeta, env)
            self._step(ReplyRejected(site, None, f"SiteError:{error.error}", error.detail))

    def _asked(self, site: str, phase: Phase, env: Envelope) -> bool:
        """Whether ``site`` is in the middle of what it was asked: cut-layer traffic from a site
        whose turn is over (it was missed at the deadline), or of another round, must not touch
        the trunk."""
        state = self.state
        if state.phase == phase and site in state.waiting_for and env.round == state.round:
            self.requests.working(site)  # it is on it: no need to send the request again
            return True
        self.state = replace(self.state, late_messages=self.state.late_messages + 1)
        return False

    def _on_activations(self, site: str, env: Envelope) -> None:
        if not self._asked(site, Phase.TRAINING, env):
            return
        every = self.config.checkpoint.every_steps
        first_micro = read_meta(StepMeta, env).micro == 0  # a step's first micro-batch opens it
        at_step = every and env.step and env.step % every == 0 and env.step != self.state.from_step
        if at_step and first_micro:
            # Steps before this one are done on both sides, and the site kept its state here.
            self._save_checkpoint(Checkpoint(self.state.step_point(env.step)))
        if self.vertical is not None:
            if self._serves_open_request(site, env):
                self._answer_parties(self.vertical.activations(site, env))
            return
        self._answer(site, self._trunk_service().activations(site, env))

    def _on_trunk_grad(self, site: str, env: Envelope) -> None:
        if not self._asked(site, Phase.TRAINING, env):
            return
        if self.vertical is not None:
            if not self._serves_open_request(site, env):
                return
            answers = self.vertical.trunk_grad(site, env)
        else:
            answer = self._trunk_service().trunk_grad(site, env)
            answers = None if answer is None else [(site, answer)]
        if answers is None:  # not the site's open step (forgotten after a restart, or a replay)
            self.state = replace(self.state, late_messages=self.state.late_messages + 1)
            return
        self._answer_parties(answers)

    def _on_eval_activations(self, site: str, env: Envelope) -> None:
        if not self._asked(site, Phase.EVALUATING, env):
            return
        if self.vertical is None:
            self._answer(site, self._trunk_service().evaluation(env))
        elif self._serves_open_request(site, env):
            self._answer_parties(self.vertical.evaluation(site, env))

    def _serves_open_request(self, site: str, env: Envelope) -> bool:
        """A vertical party's step serves the train or evaluate request open with it -- not
        one of an attempt given up when the round started over (a party restarted)."""
        open_request = self.requests.get(site)
        # (validated on arrival: a message id, or absent)
        if open_request is not None and env.meta.get("serves") == open_request.envelope.msg_id:
            return True
        self.state = replace(self.state, late_messages=self.state.late_messages + 1)
        return False

    def _on_aligned(self, site: str, env: Envelope) -> None:
        if self._answers_request(site, env):
            size = read_meta(AlignedMeta, env).size
            self._step(AlignReplied(site, dict(env.tensors), size))

    def _answer_parties(self, answers: list[tuple[str, Answer]]) -> None:
        """A vertical step's answers: each party's, once every party's request is in."""
        for party, answer in answers:
            self._answer(party, answer)

    def _answer(self, site: str, answer: Answer) -> None:
        self._reply(site, answer.envelope, cast=set(answer.cast), wait=False)

    _handlers: ClassVar[dict[str, Callable[[Coordinator, str, Envelope], None]]] = {
        Kind.HELLO: _on_hello,
        Kind.STATS: _on_stats,
        Kind.ACTIVATIONS: _on_activations,
        Kind.TRUNK_GRAD: _on_trunk_grad,
        Kind.EVAL_ACTIVATIONS: _on_eval_activations,
        Kind.DONE: _on_done,
        Kind.METRICS: _on_metrics,
        Kind.FINISHED: _on_finished,
        Kind.ERROR: _on_error,
        Kind.ALIGNED: _on_aligned,
    }

    def _trunk_service(self) -> TrunkService:
        if self.trunk_service is None:
            raise ValueError(f"mode {self.config.mode} exchanges no cut-layer tensors")
        return self.trunk_service

    def _on_presence(self, topic: str, presence: Presence) -> None:
        party = topics.parse(topic).site
        if party == AGGREGATOR_ID:
            self._aggregator_presence(presence)
        elif (
            party is not None
            and party in self.state.sites
            and not self.state.sites[party].revoked
            and presence.state != "probe"
        ):
            self._step(SitePresence(party, presence.state == "online"))

    def _aggregator_presence(self, other: Presence) -> None:
        mine = self.presence
        if mine is None or other.incarnation == mine.incarnation or other.state == "offline":
            return
        if other.state == "probe":
            log.info(
                "an aggregator is checking whether job %s is coordinated: it is", self.config.job_id
            )
            return
        if (other.since, other.incarnation) < (mine.since, mine.incarnation):
            self._rival = other  # it was first: this one stops
            return
        log.warning(
            "another aggregator started for job %s (%s); it will stop",
            self.config.job_id,
            other.describe(),
        )
        self.endpoint.transport.publish(
            topics.aggregator_presence(self.config.job_id), mine.to_bytes(), retain=True
        )

    def _refuse_stranger(self, site: str, env: Envelope) -> None:
        """A site that is not in the job is told so (at most every few seconds), nothing else."""
        if env.kind != Kind.HELLO:
            log.warning("message %s from unknown site %r ignored", env.kind, site)
            return
        now = self.clock()
        if now - self._refused_at.get(site, -REFUSAL_INTERVAL_S) < REFUSAL_INTERVAL_S:
            return
        if len(self._refused_at) >= MAX_REMEMBERED_STRANGERS:  # bounded, whatever ids arrive
            self._refused_at.clear()
        self._refused_at[site] = now
        log.warning("site %r is not part of job %s; told it so", site, self.config.job_id)
        detail = f"site {site!r} is not part of job {self.config.job_id} (its sites: {', '.join(self.config.sites)})"
        self._reply(site, env.reply(AGGREGATOR_ID, Kind.REFUSED, meta={"detail": detail}))

    def _on_reject(self, topic: str, error: WireError) -> None:
        try:
            route = topics.parse(topic)
        except ValueError:
            return
        entry = self.state.sites.get(route.site or "")
        if entry is None or entry.revoked:
            return
        site = entry.site_id
        if route.kind is not None and not isinstance(error, LOST_IN_TRANSIT):
            # The answer a step waits for, refused, costs the site that step (and the refusal
            # tells it why); one that merely did not arrive whole comes again with a repeat.
            was_refused = site in self.state.refused
            self._step(ReplyRejected(site, route.kind, type(error).__name__))
            if site in self.state.refused and not was_refused:
                return
        if self.error_replies.allow(site):
            meta = {"error": type(error).__name__, "detail": str(error)[:500]}
            self._send(site, Kind.ERROR, meta=meta)

    # -- sending -------------------------------------------------------------------------------------------

    def _send(
        self,
        site: str,
        kind: str,
        *,
        round: int = 0,
        tensors: dict[str, torch.Tensor] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self._reply(site, self._envelope(kind, round, tensors or {}, meta or {}))

    def _envelope(
        self, kind: str, round: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> Envelope:
        """A message of this aggregator, stamped with its epoch."""
        return Envelope(
            self.config.job_id,
            AGGREGATOR_ID,
            kind,
            round=round,
            tensors=tensors,
            meta={**meta, "epoch": self.epoch},
        )

    def _reply(
        self, site: str, envelope: Envelope, cast: set[str] | None = None, *, wait: bool = True
    ) -> None:
        """Send ``envelope`` to ``site``; an answer to a request (cut-layer answers, errors) is
        kept by the endpoint, so a repeat of the request gets it again, not a second update.

        Cut-layer answers go with ``wait=False``: the site's next step is the acknowledgement
        that matters, a lost answer is sent again when its request repeats, and the loop goes
        back to receiving at once (docs/wire-format.md)."""
        # Only the tensors named in ``cast`` (activations, gradients) may travel down-cast.
        send = self.endpoint.send if envelope.reply_to is None else self.endpoint.answer
        send(
            topics.down(self.config.job_id, site, envelope.kind),
            envelope,
            wire_dtype=self.config.training.wire_dtype,
            cast=cast or set(),
            wait=wait,
        )

    # -- telling people --------------------------------------------------------------------------------

    def _report_progress(self, before: JobState, after: JobState) -> None:
        for record in after.history[len(before.history) :]:
            self.on_event(
                {
                    "event": "round",
                    "round": record.round,
                    "rounds": self.config.rounds.count,
                    "mean": record.mean(),
                    "sites": record.metrics,
                    "missed": record.missed,
                }
            )
        if before.phase != after.phase and after.phase == Phase.FAILED:
            log.error("job %s failed: %s", self.config.job_id, after.failure)

    def _log_waiting(self, now: float) -> None:
        state = self.state
        missing = ", ".join(state.waiting_for) or "nobody"
        left = max(0.0, state.deadline - now)
        if state.phase == Phase.JOINING:
            log.info(
                "waiting for sites: %d/%d joined, missing %s (join deadline in %.0f s)",
                len(state.joined),
                len(state.sites),
                missing,
                left,
            )
            return
        if state.phase == Phase.STATISTICS:
            log.info("waiting for statistics from %s (deadline in %.0f s)", missing, left)
            return
        if state.phase == Phase.FINISHING:
            log.info(
                "job done: waiting for %s to confirm they have their final model (%.0f s left)",
                missing,
                left,
            )
            return
        what = "to train" if state.phase == Phase.TRAINING else "to evaluate"
        log.info(
            "round %d (of rounds 0-%d): waiting for %s %s (round deadline in %.0f s)",
            state.round,
            self.config.rounds.count - 1,
            missing,
            what,
            left,
        )

    # -- the result ----------------------------------------------------------------------------------------

    def final_tensors(self) -> dict[str, torch.Tensor]:
        """What ``finish`` carries: the final global state, and the trunk if the job releases it."""
        keys = final_keys(self.config.plan, self.config.mode, self.config.release_trunk)
        state = self.final_state()
        if self.sealed:
            keys = [SEALS, *(k for k in keys if k not in edge_keys(self.config.plan))]
        return {k: state[k] for k in keys}

    def final_state(self) -> dict[str, torch.Tensor]:
        """The weights the aggregator holds at the end.

        Split modes: the whole model (trunk from here, head/tail as last trained or averaged);
        sealed: the trunk and the last turn's seals, which only the sites can open.
        ``fedavg``: the whole averaged model. ``flop``: only the shared tensors -- each site's
        private layers exist only in that site's state directory.
        """
        trunk = {} if self.trunk is None else self.trunk.module.state_dict()
        return {**{k: v.detach().cpu() for k, v in trunk.items()}, **self.state.weights}


def _fixed_normalization(
    config: JobConfig,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[()] | None:
    """The job's fixed statistics, () for none, or None for the statistics round."""
    if config.mode == Mode.VERTICAL:  # each party standardises its own columns, alone
        return ()
    if config.normalization == "federated":
        return None
    if config.normalization == "none":
        return ()
    norm = config.normalization
    assert not isinstance(norm, str)
    return torch.tensor(norm.mean, dtype=torch.float32), torch.tensor(norm.std, dtype=torch.float32)


def _trunk(config: JobConfig, model: torch.nn.Module, device: torch.device) -> Trunk | None:
    """The trunk of a split job (None in federated ones); a copy per site in parallel rounds,
    one for all the parties of a vertical job, who step together."""
    if not MODES[config.mode].cut_layer:
        return None
    return Trunk(
        split_model(model, config.plan).trunk,
        config.training.optimizer,
        device,
        parallel=config.orchestration == Orchestration.PARALLEL and config.mode != Mode.VERTICAL,
        precision=config.training.precision,
    )


def make_strategy(config: JobConfig) -> Strategy:
    """The strategy a job's config asks for (SplitFed averages head/tail like FedAvg)."""
    if config.mode == Mode.VERTICAL:
        return Together()
    rounds = config.rounds
    aggregation = Aggregation(**config.aggregation.model_dump())
    base: FedAvg = (
        Flop(
            rounds.sample_fraction,
            config.quorum,
            config.seed,
            aggregation,
            private_keys=config.plan.private_keys,
        )
        if MODES[config.mode].weights == "shared"
        else FedAvg(rounds.sample_fraction, config.quorum, config.seed, aggregation)
    )
    return Cyclic(base) if config.orchestration == Orchestration.SEQUENTIAL else base


def _timings(done: DoneMeta) -> dict[str, float]:
    """Where a split site's training time went, from its ``done``: its own compute, the
    cut-layer exchanges (of which its codec), and its step count. Empty for other modes."""
    if done.exchange_seconds is None or done.codec_seconds is None or done.steps is None:
        return {}
    return {
        "compute": max(done.train_seconds - done.exchange_seconds, 0.0),
        "exchange": done.exchange_seconds,
        "codec": min(done.codec_seconds, done.exchange_seconds),
        "steps": float(done.steps),
    }
