"""The job coordinator: who takes part, whose turn it is, when a round closes.

It runs in one thread that reads the ``Endpoint`` and answers every uplink message at once:
cut-layer tensors go through the ``Trunk`` (split modes); ``done`` and ``metrics`` are collected
for the current round. What travels to the sites is the *global state*: head (and tail) weights
in split modes, the whole model in ``fedavg``, the shared tensors in ``flop``.

Sequential orchestration gives each site a turn per round and hands the global state from one
site to the next (Poirot et al.; cyclic weight transfer for the federated modes). Parallel
orchestration asks the strategy which sites train, trains them at once (SplitFed against the
one trunk, or plain local training in ``fedavg``/``flop``) and lets the strategy average what
they send back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from aggregator.strategy import FedAvg, Flop, Reply, Strategy
from aggregator.trunk import Trunk
from medsplit import protocol as p
from medsplit import topics
from medsplit.config import JobConfig
from medsplit.protocol import SPLIT_MODES, JobSpec, TensorSpecs, exchanged_keys, final_keys
from medsplit.transport import Endpoint, Received
from medsplit.wire import Envelope, WireError
from models import split_model

log = logging.getLogger(__name__)
Event = dict[str, Any]


class JobFailed(RuntimeError):
    """Too few sites joined or answered to go on."""


@dataclass
class SiteState:
    site_id: str
    joined: bool = False
    train_samples: int = 0
    test_samples: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class RoundRecord:
    round: int
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_loss: dict[str, float] = field(default_factory=dict)
    compute_seconds: dict[str, float] = field(default_factory=dict)  # each site's own training
    missed: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # this round's traffic
    seconds: float = 0.0
    train_seconds: float = 0.0

    def mean(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name in ("loss", "accuracy", "auroc"):
            values = [m[name] for m in self.metrics.values() if m.get(name) is not None]
            out[name] = sum(values) / len(values) if values else None
        return out


class Coordinator:
    def __init__(
        self,
        config: JobConfig,
        endpoint: Endpoint,
        *,
        device: torch.device | None = None,
        on_event: Callable[[Event], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.endpoint = endpoint
        self.on_event = on_event or (lambda event: None)
        self.clock = clock
        plan = config.plan
        model = plan.model.build(seed=config.seed)
        self.trunk: Trunk | None = None
        if config.mode in SPLIT_MODES:
            trunk = split_model(model, plan).trunk
            self.trunk = Trunk(trunk, config.optimizer, device or torch.device("cpu"))
        full_state = model.state_dict()
        # What the sites receive each round, and what the strategy updates from their replies.
        self.global_state = {
            k: full_state[k].detach().clone() for k in exchanged_keys(plan, config.mode)
        }
        self.strategy = make_strategy(config)
        self.spec = JobSpec(
            job_id=config.job_id,
            mode=config.mode,
            orchestration=config.orchestration,
            plan=plan,
            rounds=config.rounds,
            local_epochs=config.local_epochs,
            batch_size=config.batch_size,
            optimizer=config.optimizer,
            seed=config.seed,
            wire_dtype=config.wire_dtype,
            release_trunk=config.release_trunk,
        )
        specs = TensorSpecs(plan, config.mode, release_trunk=config.release_trunk)
        endpoint.set_expected(lambda header: specs.expected(header.kind))
        endpoint.on_reject = self._on_reject
        self.sites = {site: SiteState(site) for site in config.sites}
        self.history: list[RoundRecord] = []
        self.late_messages = 0
        self._round = -1
        self._requests: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
        self._done: dict[str, Envelope] = {}
        self._metrics: dict[str, dict[str, Any]] = {}
        self._round_bytes: dict[str, dict[str, int]] = {}

    # -- sending --------------------------------------------------------------------------------

    def _send(
        self,
        site: str,
        kind: str,
        *,
        round: int = 0,
        step: int = 0,
        tensors: dict[str, torch.Tensor] | None = None,
        meta: dict[str, Any] | None = None,
        cast: set[str] | None = None,
    ) -> None:
        envelope = Envelope(
            self.config.job_id,
            "aggregator",
            kind,
            round=round,
            step=step,
            tensors=tensors or {},
            meta=meta or {},
        )
        # Only the tensors named in ``cast`` (activations, gradients) may travel down-cast.
        wire_dtype = self.config.wire_dtype
        self.endpoint.send(
            topics.down(self.config.job_id, site, kind),
            envelope,
            wire_dtype=wire_dtype,
            cast=cast or set(),
        )

    def _on_reject(self, topic: str, error: WireError) -> None:
        try:
            site = topics.parse(topic).site
        except ValueError:
            return
        if site in self.sites:
            meta = {"error": type(error).__name__, "detail": str(error)[:500]}
            self._send(site, p.ERROR, meta=meta)

    def _request(self, site: str, kind: str, weights: dict[str, torch.Tensor]) -> None:
        """Ask a site to train or evaluate in the current round, and remember that we did."""
        self._requests[site] = (kind, weights)
        meta = {"epochs": self.config.local_epochs} if kind == p.TRAIN else {}
        self._send(site, kind, round=self._round, tensors=weights, meta=meta)

    # -- the receive loop -------------------------------------------------------------------------

    def _pump(self, until: Callable[[], bool], seconds: float) -> bool:
        """Answer messages until ``until()`` holds (True) or ``seconds`` pass (False)."""
        deadline = self.clock() + seconds
        while not until():
            remaining = deadline - self.clock()
            if remaining <= 0:
                return False
            received = self.endpoint.receive(timeout=min(remaining, 1.0))
            if received is not None:
                self._dispatch(received)
        return True

    def _dispatch(self, received: Received) -> None:
        env = received.envelope
        try:
            site = topics.parse(received.topic).site
        except ValueError:
            return
        if site not in self.sites:
            log.warning("message %s from unknown site %r ignored", env.kind, site)
            return
        handler = self._handlers.get(env.kind)
        if handler is None:
            log.warning("unexpected %s from %s ignored", env.kind, site)
            return
        try:
            handler(self, site, env)
        except (ValueError, KeyError, RuntimeError) as exc:
            # A message that passed the wire checks but still cannot be used (e.g. a step the
            # trunk cannot process) is answered with an error; it never stops the job.
            log.warning("could not handle %s from %s: %s", env.kind, site, exc)
            self._send(
                site,
                p.ERROR,
                round=env.round,
                step=env.step,
                meta={"error": type(exc).__name__, "detail": str(exc)[:500]},
            )

    def _on_hello(self, site: str, env: Envelope) -> None:
        state = self.sites[site]
        state.joined = True
        state.train_samples = int(env.meta.get("train_samples") or 0)
        state.test_samples = int(env.meta.get("test_samples") or 0)
        self._send(site, p.SETUP, meta={"spec": self.spec.to_meta()})
        self.on_event({"event": "joined", "site": site, "train_samples": state.train_samples})
        # A site that restarts mid-round says hello again: repeat what it was asked to do.
        request = self._requests.get(site)
        if request is not None:
            self._forget(site)
            self._request(site, *request)

    def _cut_layer_trunk(self) -> Trunk:
        if self.trunk is None:
            raise ValueError(f"mode {self.config.mode} exchanges no cut-layer tensors")
        return self.trunk

    def _on_activations(self, site: str, env: Envelope) -> None:
        trunk = self._cut_layer_trunk()
        if self.config.mode == "split":
            grad, loss = trunk.split_step(env.tensors["h"], env.tensors["y"])
            self._send(
                site,
                p.GRADIENTS,
                round=env.round,
                step=env.step,
                tensors={"g": grad},
                meta={"loss": loss},
                cast={"g"},
            )
        else:
            out = trunk.forward(site, env.round, env.step, env.tensors["h"])
            self._send(
                site, p.TRUNK_OUT, round=env.round, step=env.step, tensors={"t": out}, cast={"t"}
            )

    def _on_trunk_grad(self, site: str, env: Envelope) -> None:
        grad = self._cut_layer_trunk().backward(site, env.round, env.step, env.tensors["g"])
        if grad is None:
            self.late_messages += 1
            return
        self._send(
            site, p.ACT_GRAD, round=env.round, step=env.step, tensors={"g": grad}, cast={"g"}
        )

    def _on_eval_activations(self, site: str, env: Envelope) -> None:
        out = self._cut_layer_trunk().evaluate(env.tensors["h"])
        self._send(site, p.EVAL_OUT, round=env.round, step=env.step, tensors={"t": out}, cast={"t"})

    def _on_done(self, site: str, env: Envelope) -> None:
        if env.round != self._round:
            self.late_messages += 1
            return
        self._done[site] = env
        self._requests.pop(site, None)

    def _on_metrics(self, site: str, env: Envelope) -> None:
        if env.round != self._round:
            self.late_messages += 1
            return
        self._metrics[site] = dict(env.meta)
        self._requests.pop(site, None)
        state = self.sites[site]
        up, down = int(env.meta.get("bytes_up") or 0), int(env.meta.get("bytes_down") or 0)
        # Sites report running totals; a round's traffic is the growth since the last report.
        self._round_bytes[site] = {"up": up - state.bytes_up, "down": down - state.bytes_down}
        state.bytes_up, state.bytes_down = up, down

    def _on_error(self, site: str, env: Envelope) -> None:
        log.warning("site %s reported an error: %s", site, dict(env.meta))

    _handlers: ClassVar[dict[str, Callable[[Coordinator, str, Envelope], None]]] = {
        p.HELLO: _on_hello,
        p.ACTIVATIONS: _on_activations,
        p.TRUNK_GRAD: _on_trunk_grad,
        p.EVAL_ACTIVATIONS: _on_eval_activations,
        p.DONE: _on_done,
        p.METRICS: _on_metrics,
        p.ERROR: _on_error,
    }

    # -- the job ------------------------------------------------------------------------------------

    def run(self) -> list[RoundRecord]:
        self._await_sites()
        for round in range(self.config.rounds):
            self._run_round(round)
        final = self.final_tensors()
        for site in self._joined():  # each over its own channel
            self._send(site, p.FINISH, round=self.config.rounds, tensors=final)
        self.endpoint.flush()
        return self.history

    def _joined(self) -> list[str]:
        return [s for s, state in self.sites.items() if state.joined]

    def _await_sites(self) -> None:
        everyone = lambda: all(state.joined for state in self.sites.values())  # noqa: E731
        self._pump(everyone, self.config.join_deadline_s)
        joined = self._joined()
        if len(joined) < self.config.quorum:
            raise JobFailed(
                f"only {len(joined)} of {len(self.sites)} sites joined within {self.config.join_deadline_s:g} s (min_sites={self.config.quorum})"
            )

    def _run_round(self, round: int) -> None:
        started = self.clock()
        self._round, self._done, self._metrics, self._requests = round, {}, {}, {}
        self._round_bytes = {}
        record = RoundRecord(round)
        if self.config.orchestration == "sequential":
            self._train_sequential(round, record)
        else:
            self._train_parallel(round, record)
        record.train_seconds = self.clock() - started
        participants = self._joined()
        for site in participants:
            self._request(site, p.EVALUATE, self.global_state)
        self._pump(
            lambda: all(s in self._metrics for s in participants), self.config.round_deadline_s
        )
        record.metrics = {s: self._metrics[s] for s in participants if s in self._metrics}
        record.bytes = dict(self._round_bytes)
        record.seconds = self.clock() - started
        self.history.append(record)
        self.on_event(
            {
                "event": "round",
                "round": round,
                "rounds": self.config.rounds,
                "mean": record.mean(),
                "sites": record.metrics,
                "missed": record.missed,
            }
        )

    def _train_sequential(self, round: int, record: RoundRecord) -> None:
        for site in self._joined():
            self._request(site, p.TRAIN, self.global_state)
            if self._pump(lambda site=site: site in self._done, self.config.round_deadline_s):  # type: ignore[misc]
                done = self._done[site]
                if self._acceptable(self._reply(site)):
                    self.global_state = {k: done.tensors[k] for k in self.global_state}
                    self._record_training(record, site)
                else:
                    record.missed.append(site)
            else:
                record.missed.append(site)
                self._forget(site)
                log.warning("round %d: %s did not finish its turn in time; moving on", round, site)

    def _train_parallel(self, round: int, record: RoundRecord) -> None:
        participants = self.strategy.configure_round(round, self._joined())
        if len(participants) < self.config.quorum:
            raise JobFailed(
                f"round {round}: only {len(participants)} sites present (min_sites={self.config.quorum})"
            )
        for site in participants:
            self._request(site, p.TRAIN, self.global_state)
        self._pump(lambda: all(s in self._done for s in participants), self.config.round_deadline_s)
        answered = [s for s in participants if s in self._done and self._acceptable(self._reply(s))]
        record.missed = [s for s in participants if s not in answered]
        for site in record.missed:
            self._forget(site)
        if len(answered) < self.config.quorum:
            raise JobFailed(
                f"round {round}: only {len(answered)} sites answered before the deadline (min_sites={self.config.quorum})"
            )
        replies = [self._reply(s) for s in answered]
        self.global_state = self.strategy.aggregate(self.global_state, replies)
        for site in answered:
            self._record_training(record, site)

    def _record_training(self, record: RoundRecord, site: str) -> None:
        meta = self._done[site].meta
        record.trained.append(site)
        record.train_loss[site] = float(meta.get("train_loss") or 0.0)
        record.compute_seconds[site] = float(meta.get("train_seconds") or 0.0)

    def _reply(self, site: str) -> Reply:
        done = self._done[site]
        return Reply(site, done.tensors, int(done.meta.get("samples") or 0))

    def _acceptable(self, reply: Reply) -> bool:
        """Whether the strategy takes this reply; a refused one counts as missed, never fatal."""
        try:
            self.strategy.check_reply(self.global_state, reply)
        except ValueError as exc:
            log.warning("round %d: reply of %s refused: %s", self._round, reply.site, exc)
            self._send(
                reply.site,
                p.ERROR,
                round=self._round,
                meta={"error": "ReplyRefused", "detail": str(exc)[:500]},
            )
            return False
        return True

    def _forget(self, site: str) -> None:
        if self.trunk is not None:
            self.trunk.forget(site)

    def final_tensors(self) -> dict[str, torch.Tensor]:
        """What ``finish`` carries: the final global state, and the trunk if the job releases it."""
        keys = final_keys(self.config.plan, self.config.mode, self.config.release_trunk)
        state = self.final_state()
        return {k: state[k] for k in keys}

    def final_state(self) -> dict[str, torch.Tensor]:
        """The weights the aggregator holds at the end.

        Split modes: the whole model (trunk from here, head/tail as last trained or averaged).
        ``fedavg``: the whole averaged model. ``flop``: only the shared tensors -- each site's
        private layers exist only in that site's state directory.
        """
        trunk = {} if self.trunk is None else self.trunk.module.state_dict()
        return {**{k: v.detach().cpu() for k, v in trunk.items()}, **self.global_state}


def make_strategy(config: JobConfig) -> Strategy:
    """The strategy a job's config asks for (SplitFed averages head/tail like FedAvg)."""
    fraction, quorum, seed = config.sample_fraction, config.quorum, config.seed
    if config.mode == "flop":
        return Flop(fraction, quorum, seed, private_keys=config.plan.private_keys)
    return FedAvg(fraction, quorum, seed)
