"""``medsplit aggregator --config job.yaml``: the server-side process.

Started again with the same job, it resumes from the newest valid checkpoint (``--fresh``
starts over). SIGTERM -- a pod being moved -- stops it cleanly with exit status 0: every closed
round is already checkpointed, and the next start goes on from there.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from aggregator.checkpoint import CheckpointMismatch, CheckpointStore
from aggregator.config import JobConfig
from aggregator.coordinator import Coordinator, JobFailed, JobInterrupted
from aggregator.observability import JobCollector
from aggregator.observability import status as job_status
from aggregator.report import build_report, write_report, write_run
from medsplit.devices import pick_device, use_deterministic_algorithms
from medsplit.health import Check, certificate_valid, connected, start_health, writable
from medsplit.ids import AGGREGATOR_ID
from medsplit.protocol.spec import segments_sealed
from medsplit.security.seal import Roster, SealError, ca_public_key
from medsplit.security.seal_kit import load_roster
from medsplit.wiring import (
    Connector,
    JobAlreadyCoordinated,
    Party,
    mqtt_connector,
    open_aggregator,
)
from models import ConfigError
from models.plan_check import check_recomposition

log = logging.getLogger(__name__)

STATUS_PAGE = Path(__file__).with_name("static") / "status.html"  # the live page at /

EXIT_FAILED = 1
EXIT_ALREADY_COORDINATED = 3


def run(
    config: JobConfig, *, events: bool = False, fresh: bool = False, linger: bool = False
) -> int:
    """Run the job to the end; returns the process exit status. With ``linger`` the process
    then stays up, serving its health endpoints, until SIGTERM (``--after-finish wait``)."""
    done = None if fresh else _completed(config)
    if done is not None:
        log.info(
            "job %s already completed (%s): nothing to do; --fresh starts it over",
            config.job_id,
            done,
        )
    if config.checkpoint.enabled and fresh:
        store = CheckpointStore(config.checkpoint_dir, keep=config.checkpoint.keep)
        for old in store.paths():
            old.unlink()
        log.info("--fresh: removed the checkpoints of job %s", config.job_id)
    connector = mqtt_connector(
        config.broker, AGGREGATOR_ID, config.job_id
    )  # checks the certificate first
    parties: list[Party] = []  # the health server's view of the connection, once there is one
    coordinators: list[Coordinator] = []  # and of the job, once it runs
    health = start_health(
        config.http,
        _readiness(config, parties),
        "aggregator",
        collectors=[JobCollector(lambda: coordinators[0] if coordinators else None)],
        pages={"/": ("text/html; charset=utf-8", STATUS_PAGE.read_bytes())},
    )
    if health is not None:
        health.status = lambda: (
            job_status(coordinators[0])
            if coordinators
            else {"job_id": config.job_id, "phase": "completed" if done else "connecting"}
        )
    try:
        code = (
            0 if done is not None else _run(config, connector, parties, coordinators, events=events)
        )
        if linger and health is not None and code == 0:
            health.linger(f"job {config.job_id} is over; its report is in {config.output_dir}")
        return code
    finally:
        if health is not None:
            health.stop()


def _completed(config: JobConfig) -> Path | None:
    """The report of this job when it completed and every site confirmed its final model: a
    restarted pod must not run it again. A site that has not confirmed is served its model by
    a restart (docs/operations.md), so such a job is not done yet."""
    report = config.output_dir / "report.json"
    try:
        data = json.loads(report.read_text())
        done = data["job_id"] == config.job_id and data["status"] == "completed"
        return report if done and not data["faults"]["unconfirmed_finish"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no report, or not one this version understands: run the job


def _readiness(config: JobConfig, parties: list[Party]) -> dict[str, Check]:
    checks = {"broker": connected(lambda: parties[0].transport if parties else None)}
    if config.checkpoint.enabled:
        checks["checkpoints"] = writable(config.checkpoint_dir)
    tls = config.broker.tls
    checks["certificate"] = certificate_valid(
        tls.cert_file if tls else None, config.http.ready_cert_days
    )
    return checks


def job_roster(config: JobConfig) -> Roster | None:
    """The sites' public sealing keys, when the job seals segments; ConfigError otherwise."""
    if not segments_sealed(config.mode, config.seal_segments):
        return None
    path = config.security.roster_file
    field = "security.roster_file"
    if path is None:
        raise ConfigError(
            "job.yaml",
            [
                (
                    field,
                    "required: this split job seals the sites' segments (seal_segments: true); "
                    "give the roster.json `medsplit provision` wrote into the aggregator's kit",
                )
            ],
        )
    try:
        ca = ca_public_key(config.broker.tls.ca_file) if config.broker.tls else None
        roster = load_roster(path, config.job_id, ca)
    except SealError as exc:
        raise ConfigError("job.yaml", [(field, str(exc))]) from None
    missing = [site for site in config.sites if site not in roster.sites]
    if missing:
        raise ConfigError(
            "job.yaml",
            [(field, f"no sealing keys for {', '.join(missing)} (medsplit provision --add-site)")],
        )
    return roster


def _run(
    config: JobConfig,
    connector: Connector,
    parties: list[Party],
    coordinators: list[Coordinator],
    *,
    events: bool,
) -> int:
    roster = job_roster(config)  # a missing or foreign roster: one clear line, before any work
    if config.plan.model.traced:  # a network cut by module name: its segments must recompose
        check_recomposition(config.plan)
    if config.training.deterministic:
        use_deterministic_algorithms()
    store = None
    if config.checkpoint.enabled:
        store = CheckpointStore(config.checkpoint_dir, keep=config.checkpoint.keep)
    try:
        party = open_aggregator(
            config.job_id,
            connector,
            client_id=config.broker.client_id,
            check_timeout_s=config.broker.publish_timeout_s,
        )
    except JobAlreadyCoordinated as exc:
        log.error("refusing to start: %s", exc)
        return EXIT_ALREADY_COORDINATED
    parties.append(party)
    log.info(
        "aggregator of job %s online (epoch %s): %s, %s, %d sites, %d rounds",
        config.job_id,
        party.incarnation,
        config.mode,
        config.orchestration,
        len(config.sites),
        config.rounds.count,
    )

    def emit(event: dict[str, object]) -> None:
        if events:  # machine-readable progress for `medsplit demo`
            print(json.dumps(event), flush=True)
        if event["event"] == "round":
            mean = event["mean"]
            assert isinstance(mean, dict)
            log.info(
                "round %d closed (of rounds 0-%d): mean accuracy %s, loss %s, missed %s",
                event["round"],  # from 0, as in report.json and the agents' lines
                int(event["rounds"]) - 1,  # type: ignore[call-overload]
                _fmt(mean["accuracy"]),
                _fmt(mean["loss"]),
                ", ".join(event["missed"]) or "none",  # type: ignore[arg-type]
            )

    try:
        coordinator = Coordinator(
            config,
            party.endpoint,
            device=pick_device(config.device),
            on_event=emit,
            presence=party.presence,
            checkpoints=store,
            roster=roster,
        )
    except CheckpointMismatch as exc:
        party.close()
        log.error("refusing to start: %s", exc)
        return EXIT_FAILED
    coordinators.append(coordinator)
    previous = signal.signal(signal.SIGTERM, _stopper(coordinator))
    started = time.monotonic()
    status, code = "completed", 0
    try:
        coordinator.run()
    except JobFailed as exc:
        log.error("job failed: %s", exc)
        status, code = "failed", EXIT_FAILED
    except JobInterrupted as exc:
        log.info("%s; the next start resumes from %s", exc, coordinator.last_checkpoint)
        status = "interrupted"
    finally:
        signal.signal(signal.SIGTERM, previous)
        party.close()
    report = build_report(coordinator, time.monotonic() - started, status)
    if status == "interrupted":  # no final weights: the job is not over
        write_report(config.output_dir, report)
        return 0
    write_run(config.output_dir, report, coordinator.final_state())
    emit({"event": "finished", "status": status, "run_dir": str(Path(config.output_dir).resolve())})
    log.info("report written to %s", config.output_dir / "report.json")
    return code


def _stopper(coordinator: Coordinator) -> Callable[[int, FrameType | None], None]:
    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("SIGTERM: stopping after the current message")
        coordinator.stop()

    return stop


def _fmt(value: object) -> str:
    return "n/a" if not isinstance(value, float) else f"{value:.4f}"
