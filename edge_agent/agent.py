"""The hospital-side process: says hello, receives the job, trains its layers on request.

Everything happens in one thread that reads from the ``Endpoint``: MQTT callbacks only enqueue
(see ``medsplit.transport``). Its position in the job is one ``Lifecycle`` value with pure transitions
(``edge_agent.lifecycle``), driven by the aggregator's messages and presence: it *announces* itself (``hello``, repeated with backoff) until ``setup``
arrives, is then *ready*, *trains* on ``train`` (local epochs: in split modes exchanging
cut-layer tensors step by step, in federated modes entirely locally), *evaluates* on
``evaluate`` (held-out metrics) and is *finished* on ``finish`` (it assembles this site's own
model from the final weights, keeps it in the state directory and exports it to ONNX). A
``refused`` (this site is not in the job) ends it with ``NotInJob``; a spec naming a model
factory the site does not allow ends it with ``ForeignCode``, before the factory is imported.

Every hello carries the agent's *incarnation*, an id of this process, so the aggregator tells
a repeated hello (answered with the same ``setup``, which the agent ignores) from a restarted
agent (whose unfinished request it repeats). When the aggregator's presence shows a new epoch
(it restarted), the agent announces itself again. While it waits, it says what for.

Surviving faults:

* a step's request unanswered within ``retry_interval_s`` is published again with the same
  message id (the aggregator answers a repeat with the same answer); a step whose aggregator
  went offline or restarted is abandoned at once instead of waiting out ``reply_timeout_s``;
* every answer to an aggregator's request is kept (the last few), and a repeated request --
  its answer was lost -- gets it again; requests of an older aggregator epoch are dropped;
* before training a round (and every few steps of a sequential split round) the site keeps a
  snapshot of its layers, optimizer and random state (``edge_agent.recovery``): a round a
  restarted aggregator redoes, or resumes at a step, is the round it would have been.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from edge_agent.data.site_data import SiteData
from edge_agent.data.vertical import PartyTable
from edge_agent.learners import FederatedLearner, Learner, Progress, SplitLearner
from edge_agent.lifecycle import Action, AgentPhase, Lifecycle, SayHello
from edge_agent.local_model import LocalModel
from edge_agent.normalization import normalise, site_sums
from edge_agent.recovery import Recovery
from edge_agent.sealing import SiteSealing
from edge_agent.segments import EdgeSegments
from edge_agent.site_store import SiteStore
from edge_agent.vertical_party import VerticalParty
from medsplit.channel import Endpoint, Received, next_retry
from medsplit.config import DefenseSettings
from medsplit.devices import use_deterministic_algorithms
from medsplit.evaluation import Tally
from medsplit.modes import Mode
from medsplit.privacy.accounting import PrivacyLedger, finite_or_none
from medsplit.privacy.defenses import SiteDefenses
from medsplit.protocol import JobSpec, Kind, TensorSpecs, topics
from medsplit.protocol.meta import MessageRules
from medsplit.protocol.presence import Presence, new_incarnation
from medsplit.protocol.spec import SEAL, SEALS
from medsplit.security.seal import SealError
from medsplit.statistics import class_counts, normalization_digest
from medsplit.throttle import error_replies
from medsplit.training import evaluate_logits
from medsplit.wire import Envelope, Header, TensorSpec, WireError
from medsplit.wire.frame import MetaValue
from models import SplitPlan, cut_shapes
from models.factory import FactoryError

log = logging.getLogger(__name__)


KEPT_REQUESTS = 4
REQUESTS = frozenset({Kind.STATS_REQUEST, Kind.TRAIN, Kind.EVALUATE, Kind.FINISH})
# Arriving during a step, these are kept for the main loop; anything else then is stale.
MAIN_LOOP_KINDS = frozenset(
    {Kind.FINISH, Kind.SETUP, Kind.TRAIN, Kind.EVALUATE, Kind.REFUSED, Kind.NORMALIZATION}
)


@dataclasses.dataclass(frozen=True)
class InFlight:
    """A cut-layer request awaiting its answer, with what it was sent with (repeats are sent
    the same way)."""

    request: Envelope
    answer: str  # the kind that answers it
    cast: set[str]


class StepTimeout(RuntimeError):
    """The aggregator did not answer a training step in time (or went away); the round is
    abandoned."""


def _short(values: torch.Tensor) -> str:
    shown = ", ".join(f"{v:.3g}" for v in values[:4].tolist())
    return f"[{shown}{', ...' if len(values) > 4 else ''}]"


class NotInJob(RuntimeError):
    """The aggregator says this site is not part of the job."""


class ForeignCode(RuntimeError):
    """The job spec names a model factory this site does not allow (``models.allow``)."""


class Agent:
    def __init__(
        self,
        site_id: str,
        job_id: str,
        endpoint: Endpoint,
        data: SiteData | PartyTable,
        *,
        device: torch.device | None = None,
        reply_timeout_s: float = 300.0,
        hello_interval_s: float = 5.0,
        state_dir: Path | None = None,
        export_onnx: bool = False,
        joint_export: bool = False,
        status_interval_s: float = 10.0,
        retry_interval_s: float = 5.0,
        incarnation: str | None = None,
        sealing: SiteSealing | None = None,
        allow_factories: tuple[str, ...] = (),
    ) -> None:
        """``sealing``: this site's sealing keys and the CA its roster must be signed by; a job
        that seals segments (every split job by default) cannot be joined without them.
        ``allow_factories``: site.yaml's ``models.allow``, the code a job spec may name."""
        self.site_id, self.job_id = site_id, job_id
        self.endpoint = endpoint
        # A vertical party's table: its rows to train on are known once the parties aligned.
        self.party = None if isinstance(data, SiteData) else VerticalParty(site_id, data, state_dir)
        site_data = data if isinstance(data, SiteData) else data.provisional()
        self.loaded = site_data  # as the data source made it
        self.data = site_data  # what training sees: after the federation's normalisation
        self.normalization: str | None = None  # the digest of the normalisation applied
        self.device = device or torch.device("cpu")
        self.reply_timeout_s = reply_timeout_s
        self.retry_interval_s = retry_interval_s
        self.state_dir = state_dir
        self.export_onnx = export_onnx
        self.store = SiteStore(
            site_id, state_dir, export_onnx=export_onnx, joint_export=joint_export
        )
        self.sealing = sealing
        self.allow_factories = allow_factories
        self.foreign_code: str | None = None  # why a job spec was refused: code not allowed
        self.ledger = PrivacyLedger(DefenseSettings())  # the job's, from its setup message
        self.spec: JobSpec | None = None
        self.specs: TensorSpecs | None = None
        self.defenses = SiteDefenses(DefenseSettings())  # the job's, from its setup message
        self.learner: Learner | None = None
        self.incarnation = incarnation or new_incarnation()
        self.lifecycle = Lifecycle(
            site_id, job_id, hello_interval_s=hello_interval_s, status_interval_s=status_interval_s
        )
        self._stop = threading.Event()
        self._backlog: deque[Received] = deque()
        self._requests: OrderedDict[str, Envelope] = OrderedDict()  # the last few requests
        self._working_on: str | None = None  # the msg_id of the request in progress
        # Cut-layer requests awaiting their answer, and answers that came before they were
        # awaited (a pipelined step's micro-batches), by request msg_id.
        self._in_flight: dict[str, InFlight] = {}
        self._answers: dict[str, Envelope] = {}
        self.recovery = Recovery(site_id, job_id, state_dir)
        self.resent = 0  # step requests published again
        self.progress = Progress()
        endpoint.on_reject = self._report_reject
        self._error_replies = error_replies()
        endpoint.on_presence = self._on_presence
        endpoint.on_duplicate = self._on_duplicate
        endpoint.repeat_interval_s = (
            retry_interval_s  # repeats queued in a long training: one answer
        )
        endpoint.set_expected(self._expected, MessageRules())

    @property
    def segments(self) -> EdgeSegments | LocalModel | None:
        """The layers this site trains (None before setup)."""
        return None if self.learner is None else self.learner.segments

    @property
    def phase(self) -> AgentPhase:
        return self.lifecycle.phase

    @property
    def aggregator(self) -> Presence | None:
        """The live aggregator, from its presence."""
        return self.lifecycle.aggregator

    @property
    def finished(self) -> bool:
        return self.phase == AgentPhase.FINISHED

    @property
    def hellos_sent(self) -> int:
        return self.lifecycle.hellos_total

    def _act(self, step: tuple[Lifecycle, list[Action]]) -> None:
        """Take the lifecycle's next value and carry out what it asks for."""
        self.lifecycle, actions = step
        for action in actions:
            if isinstance(action, SayHello):
                self._hello()
            else:
                (log.warning if action.warning else log.info)("%s", action.text)

    # -- plumbing ---------------------------------------------------------------------------------

    def _expected(self, header: Header) -> Mapping[str, TensorSpec] | None:
        if self.specs is None:
            return {}  # before setup nothing may carry tensors
        return self.specs.expected(header.kind, self.site_id)

    def _send(
        self,
        kind: str,
        *,
        round: int = 0,
        step: int = 0,
        tensors: Mapping[str, torch.Tensor] | None = None,
        meta: Mapping[str, MetaValue] | None = None,
        cast: set[str] | None = None,
        wait: bool = True,
    ) -> Envelope:
        envelope = Envelope(
            self.job_id,
            self.site_id,
            kind,
            round=round,
            step=step,
            tensors=dict(tensors or {}),
            meta=dict(meta or {}),
        )
        self._publish(envelope, cast, wait=wait)
        return envelope

    def _on_duplicate(self, topic: str, header: Header) -> None:
        """A request came again that this site has not answered (the endpoint answers repeats
        of answered ones): if it is not the one in progress, it was abandoned -- e.g. while
        the aggregator was briefly offline -- and is taken up again."""
        request = self._requests.get(header.msg_id)
        queued = any(r.envelope.msg_id == header.msg_id for r in self._backlog)
        if request is not None and self._working_on != header.msg_id and not queued:
            # e.g. a step abandoned while the aggregator was briefly offline: take it up again
            log.info("%s: %s came again, unanswered; handling it again", self.site_id, header.kind)
            self._backlog.append(Received(topic, request))

    def _publish(
        self, envelope: Envelope, cast: set[str] | None = None, *, wait: bool = True
    ) -> None:
        """Send ``envelope`` up; an answer to a request is kept by the endpoint for a repeat.
        ``wait=False`` for a step's request: its answer acknowledges it, and it is repeated
        while no answer comes."""
        # Only the tensors named in ``cast`` (activations, gradients) may travel down-cast.
        wire_dtype = self.spec.wire_dtype if self.spec else "float32"
        send = self.endpoint.send if envelope.reply_to is None else self.endpoint.answer
        send(
            topics.up(self.job_id, self.site_id, envelope.kind),
            envelope,
            wire_dtype=wire_dtype,
            cast=cast or set(),
            wait=wait,
        )

    def _report_reject(self, topic: str, error: WireError) -> None:
        if not self._error_replies.allow(topic):
            return  # a flood of bad frames is answered a few times, never once per frame
        self._send(
            Kind.ERROR,
            meta={"error": type(error).__name__, "detail": str(error)[:500], "topic": topic},
        )

    def _await(self, request: Envelope) -> Envelope:
        """The reply to a step's ``request``; answers to the step's other requests in flight
        are kept for ``answer_to``, other messages for the main loop.

        Every request in flight is published again (same message id) while no answer comes,
        and the step is abandoned as soon as the aggregator that was asked went offline or
        restarted.
        """
        round, step = request.round, request.step
        kind = self._in_flight[request.msg_id].answer
        started = time.monotonic()
        deadline = started + self.reply_timeout_s
        next_status = started + self.lifecycle.status_interval_s
        retry = self.retry_interval_s
        retry_at = started + retry
        asked = self.aggregator
        while (remaining := deadline - time.monotonic()) > 0:
            if self._stop.is_set():
                raise StepTimeout("the agent was asked to stop")
            if asked is not None and self.aggregator != asked:
                now_live = self.aggregator
                raise StepTimeout(
                    "the aggregator went offline"
                    if now_live is None
                    else f"the aggregator restarted ({now_live.describe()})"
                )
            if time.monotonic() >= retry_at:
                log.info(
                    "%s: round %d step %d: no %s after %.0f s; sending %s again",
                    self.site_id,
                    round,
                    step,
                    kind,
                    retry,
                    request.kind,
                )
                for unanswered in self._in_flight.values():
                    self._publish(unanswered.request, unanswered.cast)
                    self.resent += 1
                retry = next_retry(retry, self.retry_interval_s)
                retry_at = time.monotonic() + retry
            if time.monotonic() >= next_status:
                log.info(
                    "%s: round %d step %d: waiting %.0f s for %s from the aggregator",
                    self.site_id,
                    round,
                    step,
                    time.monotonic() - started,
                    kind,
                )
                next_status += self.lifecycle.status_interval_s
            # Wake up now and then to notice stop(); a reply normally arrives in milliseconds.
            received = self.endpoint.receive(timeout=min(remaining, 0.5))
            if received is None:
                continue
            env = received.envelope
            flight = self._in_flight.get(env.reply_to or "")
            if flight is not None and env.kind == flight.answer:
                del self._in_flight[flight.request.msg_id]
                if env.reply_to == request.msg_id:
                    return env
                self._answers[flight.request.msg_id] = env  # another micro-batch's, early
            elif env.kind in MAIN_LOOP_KINDS:
                self._for_main_loop(received, round)
            else:
                log.warning(
                    "%s: ignoring stale %s (round %s step %s)",
                    self.site_id,
                    env.kind,
                    env.round,
                    env.step,
                )
        raise StepTimeout(
            f"no {kind} for round {round} step {step} within {self.reply_timeout_s:g} s"
        )

    def _for_main_loop(self, received: Received, round: int) -> None:
        """A message that arrived during a step, kept for the main loop; the step is given up
        if it cannot go on (the job finished, this site was refused, the round started over)."""
        self._backlog.append(received)
        env = received.envelope
        if env.kind in (Kind.FINISH, Kind.REFUSED):
            raise StepTimeout(f"the aggregator sent {env.kind} during a step")
        if self._started_over(env, round):
            raise StepTimeout("the aggregator started the round over")

    def _started_over(self, env: Envelope, round: int) -> bool:
        """Asked anew for the round in progress: a vertical party restarted, and every party
        redoes the round (or its evaluation) from its snapshot."""
        return (
            self.spec is not None
            and self.spec.mode == Mode.VERTICAL
            and env.kind in (Kind.TRAIN, Kind.EVALUATE)
            and env.round == round
            and env.msg_id != self._working_on
        )

    # -- main loop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run`` (in another thread) to return soon, without waiting for ``finish``."""
        self._stop.set()

    def run(self, *, max_seconds: float | None = None) -> None:
        """Serve the job until ``finish`` (or ``max_seconds``); ``NotInJob`` if refused."""
        stop_at = None if max_seconds is None else time.monotonic() + max_seconds
        while not self.finished and not self._stop.is_set():
            if stop_at is not None and time.monotonic() > stop_at:
                raise TimeoutError(f"{self.site_id}: job not finished within {max_seconds} s")
            self._act(self.lifecycle.tick(time.monotonic()))
            timeout = max(0.0, min(0.5, self.lifecycle.wake_at() - time.monotonic()))
            received = (
                self._backlog.popleft() if self._backlog else self.endpoint.receive(timeout=timeout)
            )
            if received is not None:
                self._handle(received.envelope)
            if self.lifecycle.refusal is not None:
                raise NotInJob(self.lifecycle.refusal)
            if self.foreign_code is not None:
                raise ForeignCode(self.foreign_code)

    def _hello(self) -> None:
        meta: dict[str, MetaValue] = {
            "train_samples": self.data.train_samples,
            "test_samples": len(self.data.y_test),
            "incarnation": self.incarnation,
        }
        self._send(Kind.HELLO, meta=meta)

    def _on_presence(self, topic: str, presence: Presence) -> None:
        self._act(self.lifecycle.saw_aggregator(presence, time.monotonic()))

    def _remember_request(self, env: Envelope) -> None:
        if env.kind in REQUESTS:
            self._requests[env.msg_id] = env
            while len(self._requests) > KEPT_REQUESTS:
                self._requests.popitem(last=False)

    def _of_another_epoch(self, env: Envelope) -> bool:
        """A request stamped by an aggregator that is no longer the live one (a replay, or a
        message queued for this site before the aggregator restarted)."""
        epoch, live = env.meta.get("epoch"), self.aggregator
        if epoch is None or live is None or epoch == live.incarnation:
            return False
        log.info(
            "%s: dropped %s of round %d from an earlier aggregator epoch (%s; live: %s)",
            self.site_id,
            env.kind,
            env.round,
            epoch,
            live.incarnation,
        )
        return True

    def _handle(self, env: Envelope) -> None:
        if env.kind != Kind.ERROR and self._of_another_epoch(env):
            return
        self._remember_request(env)
        try:
            self._dispatch(env)
        except StepTimeout as exc:
            log.warning("%s: round %s abandoned: %s", self.site_id, env.round, exc)
        except FactoryError as exc:  # the aggregator stops waiting; this agent leaves
            self.foreign_code = str(exc)
            self._publish(env.error(self.site_id, type(exc).__name__, str(exc)))
        except (ValueError, KeyError, RuntimeError, WireError) as exc:
            # e.g. a setup whose job spec does not validate, or a model poisoned into
            # non-finite weights that cannot be sent: report it (the aggregator stops waiting
            # for this site's answer), keep serving.
            log.warning("%s: could not handle %s: %s", self.site_id, env.kind, exc)
            log.debug("%s: where %s failed", self.site_id, env.kind, exc_info=True)
            self._publish(env.error(self.site_id, type(exc).__name__, str(exc)))
        finally:  # a step's requests die with it: none is in flight between requests
            self._in_flight.clear()
            self._answers.clear()

    def _dispatch(self, env: Envelope) -> None:
        if env.kind == Kind.SETUP:
            self._setup(env)
        elif env.kind == Kind.STATS_REQUEST:
            self._send_stats(env)
        elif env.kind == Kind.ALIGN:
            self._align(env)
        elif env.kind == Kind.NORMALIZATION:
            self._normalise(env)
        elif env.kind in (Kind.TRAIN, Kind.EVALUATE) and not self._normalised_for(env):
            return  # the aggregator sends the normalisation again with its next repeat
        elif env.kind == Kind.TRAIN and self.segments is not None:
            self._working(AgentPhase.TRAINING, self._train, env)
        elif env.kind == Kind.EVALUATE and self.segments is not None:
            self._working(AgentPhase.EVALUATING, self._evaluate, env)
        elif env.kind == Kind.FINISH:
            self.lifecycle = self.lifecycle.finished()
            self._finish(env)
            self._publish(env.reply(self.site_id, Kind.FINISHED))
        elif env.kind == Kind.REFUSED:
            detail = str(env.meta.get("detail") or "this site is not part of the job")
            self.lifecycle = self.lifecycle.refused(detail)
        elif env.kind == Kind.ERROR:
            log.warning("%s: aggregator reported an error: %s", self.site_id, dict(env.meta))

    def _normalised_for(self, env: Envelope) -> bool:
        """Whether this site applies the normalisation ``env`` was computed with."""
        needed = env.meta.get("normalization")
        if needed is None or needed == self.normalization:
            return True
        log.warning(
            "%s: %s of round %d needs the federation's normalisation %s, which has not arrived "
            "(lost?); waiting for the aggregator to send it again",
            self.site_id,
            env.kind,
            env.round,
            needed,
        )
        return False

    def _send_stats(self, env: Envelope) -> None:
        """Counts and sums of this site's training inputs: never a value leaves the site."""
        sums = site_sums(self.loaded)
        counts = class_counts(self.loaded.y_train, self._class_count())
        tensors = {"sum": sums.total, "sum_sq": sums.total_sq, "classes": counts}
        self._publish(
            env.reply(
                self.site_id,
                Kind.STATS,
                tensors=tensors,
                meta={"count": sums.count, "records": self.loaded.train_samples},
            )
        )

    def _class_count(self) -> int:
        """How many classes the job's model tells apart: the data card's, else the model's."""
        if self.loaded.card is not None:
            return len(self.loaded.card.classes)
        assert self.spec is not None
        return int(cut_shapes(self.spec.plan, 1)["logits"][-1])

    def _normalise(self, env: Envelope) -> None:
        mean, std = env.tensors["mean"], env.tensors["std"]
        weights = env.tensors.get("class_weights")
        digest = normalization_digest(mean, std, weights)
        if digest == self.normalization:
            return  # sent again with a repeated request: already applied
        self.data = dataclasses.replace(normalise(self.loaded, mean, std), class_weights=weights)
        self.normalization = digest
        log.info(
            "%s: inputs normalised with the federation's statistics (mean %s, std %s)",
            self.site_id,
            _short(mean),
            _short(std),
        )

    def _working(self, phase: AgentPhase, work: Callable[[Envelope], None], env: Envelope) -> None:
        self.lifecycle = self.lifecycle.working(phase)
        self._working_on = env.msg_id
        try:
            work(env)
        finally:  # a finish or a refusal that arrived meanwhile stands
            self._working_on = None
            self.lifecycle = self.lifecycle.idle(phase)

    def _setup(self, env: Envelope) -> None:
        spec = JobSpec.from_meta(env.meta.get("spec"), self.allow_factories)
        if spec.job_id != self.job_id:
            raise ValueError(
                f"setup for job {spec.job_id!r}, but this agent serves {self.job_id!r}"
            )
        if spec == self.spec:
            self.lifecycle = self.lifecycle.set_up()
            return  # a repeated setup (we said hello more than once): nothing to rebuild
        if spec.multilabel != (self.loaded.y_train.dim() == 2):
            raise ValueError(
                "the job is multi-label but this site's labels are one class per record (set "
                "data.multilabel)"
                if spec.multilabel
                else "this site's labels are multi-label but the job is not "
                "(training.multilabel in job.yaml)"
            )
        if spec.mode == Mode.VERTICAL:
            self._join_vertical(spec)
        if spec.deterministic:
            use_deterministic_algorithms()
        self.defenses = SiteDefenses(spec.defenses)
        self.ledger = PrivacyLedger(spec.defenses, self.store.releases(spec))
        if spec.sealed:
            self._accept_roster(spec, env)
        self.spec = spec
        self.specs = TensorSpecs(
            spec.plan,
            spec.mode,
            release_trunk=spec.release_trunk,
            sealed=spec.sealed,
            class_weights=spec.class_weights == "balanced",
            multilabel=spec.multilabel,
        )
        self.recovery = Recovery(self.site_id, self.job_id, self.state_dir)
        self.learner = (
            FederatedLearner(spec, self.device, self.progress)
            if spec.federated
            else SplitLearner(
                spec,
                self.device,
                defenses=self.defenses,
                channel=self,
                recovery=self.recovery,
                progress=self.progress,
                party=self.site_id if spec.mode == Mode.VERTICAL else None,
            )
        )
        self.recovery.load(self.learner.segments)
        if isinstance(self.learner, FederatedLearner):
            self.store.restore_private(
                spec, self.learner.segments
            )  # the newest private layers, if any
        self.lifecycle = self.lifecycle.set_up()
        log.info(
            "%s: joined job %s (%s, %s)",
            self.site_id,
            self.spec.job_id,
            self.spec.mode,
            self.spec.orchestration,
        )

    # -- training ---------------------------------------------------------------------------------

    def _train(self, env: Envelope) -> None:
        assert self.spec is not None
        assert self.learner is not None
        learner, segments = self.learner, self.learner.segments
        self.recovery.before_round(segments, env.round)
        resumed = self.recovery.go_on_from(segments, env.round, int(env.meta.get("from_step") or 0))
        if self.spec.mode == Mode.VERTICAL:
            self._check_aligned(env)
        elif resumed is None:
            segments.load(self._incoming(env, before=(env.round, self._turn(env))))
        if self.sealing is not None and self.spec.sealed:
            self.sealing.remember_start(segments.state())  # a parallel seal carries it
        segments.start_round()
        segments.train()
        started = time.perf_counter()
        exchange, codec = self.progress.exchange_seconds, self.endpoint.stats.codec_total
        epochs = int(env.meta.get("epochs", self.spec.local_epochs) or 1)
        self.ledger.before_training(epochs)  # a site past its epsilon budget trains no more
        if isinstance(learner, FederatedLearner):  # nothing leaves the site until done
            result = learner.train_round(self.data, env.round, epochs)
        else:
            every = int(env.meta.get("snapshot_every") or 0)
            result = learner.train_round(self.data, env.round, epochs, every=every, resumed=resumed)
        train_loss = result.loss
        seconds = time.perf_counter() - started
        if isinstance(learner, SplitLearner):
            self.ledger.trained(epochs)
        meta: dict[str, MetaValue] = {
            "samples": self.data.train_samples,
            "train_loss": train_loss if math.isfinite(train_loss) else None,
            "train_seconds": seconds,
            "epsilon": finite_or_none(self.ledger.epsilon()),
        }
        if isinstance(learner, SplitLearner):  # where a split round's time went
            meta |= {
                "exchange_seconds": self.progress.exchange_seconds - exchange,
                "codec_seconds": self.endpoint.stats.codec_total - codec,
                "steps": result.steps,
            }
        self.progress.rounds_trained += 1
        self.progress.compute_seconds += seconds
        self.progress.last_train_loss = train_loss
        self._publish(env.reply(self.site_id, Kind.DONE, tensors=self._outgoing(env), meta=meta))
        self.recovery.after_round(segments, env.round)
        self._save()

    # -- vertical jobs ---------------------------------------------------------------------------

    def _join_vertical(self, spec: JobSpec) -> None:
        """A vertical job needs a party's table; rows aligned before (a restart) are kept."""
        if self.party is None:
            raise ValueError(
                f"job {spec.job_id} is vertical, but {self.site_id}'s data is not a vertical "
                "party's (data.source: builtin-vertical; docs/vertical.md)"
            )
        aligned = self.party.join(spec)
        if aligned is not None:
            self.loaded = self.data = aligned

    def _align(self, env: Envelope) -> None:
        """A stage of the parties' private set intersection, relayed by the aggregator."""
        if self.spec is None or self.party is None or self.spec.mode != Mode.VERTICAL:
            raise ValueError(f"{self.site_id} is not set up as a party of a vertical job")
        tensors, size = self.party.answer(self.spec, env)
        if self.party.data is not None:
            self.loaded = self.data = self.party.data
        meta: dict[str, MetaValue] = {} if size is None else {"size": size}
        self._publish(env.reply(self.site_id, Kind.ALIGNED, tensors=tensors, meta=meta))

    def _check_aligned(self, env: Envelope) -> None:
        if self.party is None or self.party.data is None:
            raise ValueError(
                f"{env.kind} of round {env.round}: {self.site_id} has not aligned with the "
                "other parties (the job aligns again when the aggregator restarts)"
            )

    def _report_no_metrics(self, env: Envelope) -> None:
        stats = self.endpoint.stats
        meta: dict[str, MetaValue] = {
            "samples": 0,
            "bytes_up": stats.sent_bytes,
            "bytes_down": stats.received_bytes,
        }
        tensors = _no_tally(int(cut_shapes(self._plan(), 1)["logits"][-1]))
        self._publish(env.reply(self.site_id, Kind.METRICS, tensors=tensors, meta=meta))

    def _plan(self) -> SplitPlan:
        assert self.spec is not None
        return self.spec.plan

    # -- the split learner's StepChannel ---------------------------------------------------------

    def ask(
        self,
        kind: str,
        tensors: dict[str, torch.Tensor],
        answer: str,
        *,
        round: int,
        step: int,
        cast: set[str],
        meta: Mapping[str, MetaValue] | None = None,
        wait: bool = False,
    ) -> Envelope:
        """Send ``tensors`` up as ``kind`` and return the request, whose ``answer`` kind
        ``answer_to`` awaits. Several may be in flight (a pipelined step's micro-batches). A
        step's request is not waited on (``wait=False``): its answer acknowledges it, and it is
        repeated while none comes."""
        if self._working_on is not None:
            meta = {**(meta or {}), "serves": self._working_on}
        request = self._send(
            kind, round=round, step=step, tensors=tensors, meta=meta, cast=cast, wait=wait
        )
        self._in_flight[request.msg_id] = InFlight(request, answer, cast)
        return request

    def answer_to(self, request: Envelope) -> Envelope:
        """The aggregator's answer to ``request`` (sent with ``ask``)."""
        early = self._answers.pop(request.msg_id, None)
        return early if early is not None else self._await(request)

    def _save(self) -> None:
        if self.spec is not None and self.segments is not None:
            self.store.save(self.spec, self.segments, releases=self.ledger.releases)

    # -- sealed segments ---------------------------------------------------------------------------

    def _accept_roster(self, spec: JobSpec, env: Envelope) -> None:
        if self.sealing is None:
            raise SealError(
                f"job {spec.job_id} seals the sites' segments, but {self.site_id} has no sealing "
                "keys (site.yaml sealing.key_file: the seal.key `medsplit provision` wrote)"
            )
        self.sealing.accept_roster(env.meta.get("roster"), spec.job_id)

    @staticmethod
    def _turn(env: Envelope) -> int:
        return int(env.meta.get("turn") or 0)

    def _incoming(self, env: Envelope, *, before: tuple[int, int]) -> Mapping[str, torch.Tensor]:
        """The head (and tail) weights ``env`` stands for: its tensors, or in a sealed job what
        its seals open to (``edge_agent.sealing``)."""
        assert self.spec is not None
        assert self.learner is not None
        if not self.spec.sealed:
            return env.tensors
        assert self.sealing is not None
        assert isinstance(self.learner, SplitLearner)
        opened = self.sealing.open_relay(env.tensors[SEALS], self.spec, before=before)
        if opened is None:
            if env.round > 0:
                raise SealError(
                    f"{env.kind} of round {env.round} carries no seals: refusing to start from "
                    "the job's initial weights"
                )
            return self.learner.initial
        log.debug(
            "%s: %s opened the seals of %s", self.site_id, env.kind, ", ".join(opened.senders)
        )
        return opened.weights

    def _outgoing(self, env: Envelope) -> dict[str, torch.Tensor]:
        """What ``done`` carries: the trained weights, or in a sealed job their seal, to the
        job's sites the aggregator names (a revoked one is left out)."""
        assert self.spec is not None
        assert self.learner is not None
        if self.spec.mode == Mode.VERTICAL:
            return {}  # a party's head is its own: it never leaves
        state = self.learner.segments.state()
        if not self.spec.sealed:
            return state
        assert self.sealing is not None
        recipients = env.meta.get("recipients")
        seal = self.sealing.seal_state(
            state,
            self.spec,
            round=env.round,
            turn=self._turn(env),
            samples=self.data.train_samples,
            recipients=recipients.split(",") if isinstance(recipients, str) and recipients else [],
        )
        return {SEAL: seal}

    # -- the end of the job ----------------------------------------------------------------------

    def _finish(self, env: Envelope) -> None:
        """Assemble this site's own model from the final weights; keep it, and export it."""
        if self.segments is None or self.spec is None:
            return
        final = dict(env.tensors)
        if self.spec.sealed:
            final |= self._incoming(env, before=(env.round + 1, 0))
        self.store.finish(self.spec, self.segments, final, self.data)

    @property
    def site_model(self) -> Path | None:
        """Written at finish."""
        return self.store.site_model

    @property
    def onnx_model(self) -> Path | None:
        return self.store.onnx_model

    # -- evaluation -------------------------------------------------------------------------------

    def _evaluate(self, env: Envelope) -> None:
        assert self.learner is not None
        assert self.spec is not None
        if self.spec.mode == Mode.VERTICAL:
            self._check_aligned(env)
        else:
            self.learner.segments.load(self._incoming(env, before=(env.round + 1, 0)))
        self.learner.segments.train(False)
        logits = self.learner.logits(env.round, self.data.x_test.to(self.device))
        self._save()
        if isinstance(self.learner, SplitLearner) and not self.learner.holds_labels:
            self._report_no_metrics(env)  # a vertical party without labels scores nothing
            return
        metrics = evaluate_logits(logits.cpu(), self.data.y_test, self.spec.threshold)
        stats = self.endpoint.stats
        meta = {
            **metrics.as_meta(),
            "bytes_up": stats.sent_bytes,
            "bytes_down": stats.received_bytes,
            "epsilon": finite_or_none(self.ledger.epsilon()),
        }
        tensors = metrics.tally.tensors() if metrics.tally is not None else None
        self._publish(env.reply(self.site_id, Kind.METRICS, tensors=tensors, meta=meta))
        loss = self.progress.last_train_loss
        log.info(  # one line per round, for a person following the site's log
            "%s round %d: train loss %s, held-out accuracy %.3f, balanced %s, AUROC %s, "
            "loss %.4f (%d samples); %.1f s training in all; %.2f MB up, %.2f MB down",
            self.site_id,
            env.round,
            "n/a" if loss is None else f"{loss:.4f}",
            metrics.accuracy,
            _shown(metrics.clinical.get("balanced_accuracy")),
            _shown(metrics.clinical.get("macro_auroc")),
            metrics.loss,
            metrics.samples,
            self.progress.compute_seconds,
            stats.sent_bytes / 1e6,
            stats.received_bytes / 1e6,
        )


def _no_tally(classes: int) -> dict[str, torch.Tensor]:
    """The counts of no held-out record, for a party that scores none."""
    return Tally.of(torch.zeros(0, classes), torch.zeros(0, dtype=torch.int64)).tensors()


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
