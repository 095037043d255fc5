"""``medsplit aggregator --config job.yaml``: the server-side process."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from aggregator.config import JobConfig
from aggregator.coordinator import Coordinator, JobFailed
from aggregator.report import build_report, write_run
from medsplit.wiring import JobAlreadyCoordinated, mqtt_connector, open_aggregator

log = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_ALREADY_COORDINATED = 3


def run(config: JobConfig, *, events: bool = False) -> int:
    """Run the job to the end; returns the process exit status."""
    try:
        party = open_aggregator(
            config.job_id,
            mqtt_connector(config.broker),
            client_id=config.broker.client_id,
            check_timeout_s=config.broker.publish_timeout_s,
        )
    except JobAlreadyCoordinated as exc:
        log.error("refusing to start: %s", exc)
        return EXIT_ALREADY_COORDINATED
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
                "round %d/%d: mean accuracy %s, loss %s, missed %s",
                int(event["round"]) + 1,  # type: ignore[call-overload]
                event["rounds"],
                _fmt(mean["accuracy"]),
                _fmt(mean["loss"]),
                ", ".join(event["missed"]) or "none",  # type: ignore[arg-type]
            )

    coordinator = Coordinator(
        config,
        party.endpoint,
        device=torch.device("cpu"),
        on_event=emit,
        presence=party.presence,
    )
    started = time.monotonic()
    status, code = "completed", 0
    try:
        coordinator.run()
    except JobFailed as exc:
        log.error("job failed: %s", exc)
        status, code = "failed", EXIT_FAILED
    finally:
        party.close()
    report = build_report(coordinator, time.monotonic() - started, status)
    write_run(config.output_dir, report, coordinator.final_state())
    emit({"event": "finished", "status": status, "run_dir": str(Path(config.output_dir).resolve())})
    log.info("report written to %s", config.output_dir / "report.json")
    return code


def _fmt(value: object) -> str:
    return "n/a" if not isinstance(value, float) else f"{value:.4f}"
