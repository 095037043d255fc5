"""``medsplit aggregator --config job.yaml``: the server-side process."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from aggregator.coordinator import Coordinator, Event, JobFailed
from aggregator.report import build_report, write_run
from medsplit import topics
from medsplit.config import JobConfig
from medsplit.transport import Endpoint, MqttTransport

log = logging.getLogger(__name__)


def run(config: JobConfig, *, events: bool = False) -> int:
    """Run the job to the end; returns the process exit status."""
    transport = MqttTransport(config.broker.settings(f"aggregator-{config.job_id}"))
    transport.connect()
    for topic_filter in topics.aggregator_subscriptions(config.job_id):
        transport.subscribe(topic_filter)

    def emit(event: Event) -> None:
        if events:  # machine-readable progress for `medsplit demo`
            print(json.dumps(event), flush=True)
        if event["event"] == "round":
            mean = event["mean"]
            log.info(
                "round %d/%d: mean accuracy %s, loss %s",
                event["round"] + 1,
                event["rounds"],
                _fmt(mean["accuracy"]),
                _fmt(mean["loss"]),
            )

    coordinator = Coordinator(
        config, Endpoint(transport), device=torch.device("cpu"), on_event=emit
    )
    started = time.monotonic()
    status, code = "completed", 0
    try:
        coordinator.run()
    except JobFailed as exc:
        log.error("job failed: %s", exc)
        status, code = "failed", 1
    finally:
        transport.close()
    report = build_report(coordinator, time.monotonic() - started, status)
    write_run(config.output_dir, report, coordinator.final_state())
    emit({"event": "finished", "status": status, "run_dir": str(Path(config.output_dir).resolve())})
    log.info("report written to %s", config.output_dir / "report.json")
    return code


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
