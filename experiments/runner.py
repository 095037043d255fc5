"""Run every cell of an experiment grid and write the comparison.

Distributed modes run as a real job through a real broker: the aggregator and one agent per
site, each with its own MQTT connection (threads of this process, so that 20 sites do not mean
20 copies of PyTorch on a small machine). Baselines run without a network. A cell that fails is
recorded as failed with its reason, and the grid goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from rich.console import Console

from aggregator.config import JobConfig
from aggregator.coordinator import JobFailed
from aggregator.report import report_dict, write_report
from aggregator.state import RoundRecord
from edge_agent.data import datasets
from experiments.baselines import run_centralized, run_local
from experiments.config import BASELINES, Cell, ExperimentConfig
from experiments.inprocess import run_job
from experiments.progress import progress_bar
from medsplit.brokers.embedded import start_local_broker
from medsplit.config import BrokerConfig
from medsplit.transport import TransportError
from medsplit.wiring import Connector, mqtt_connector

log = logging.getLogger(__name__)


# What makes one cell fail without stopping the grid: the job's own failure, the broker, time.
CELL_FAILURES = (JobFailed, TransportError, TimeoutError, RuntimeError, ValueError)


@dataclass
class CellResult:
    cell: Cell
    status: str  # "completed" or "failed"
    history: list[RoundRecord] = field(default_factory=list)
    traffic: dict[str, dict[str, int]] = field(default_factory=dict)  # per site, whole job
    wall_time_s: float = 0.0
    error: str = ""

    def final(self) -> dict[str, float | None]:
        """Mean over sites of the last round's held-out metrics."""
        if not self.history:
            return {"loss": None, "accuracy": None, "auroc": None}
        return self.history[-1].mean()

    def pooled(self) -> dict[str, float | None]:
        """The last round's metrics of every site's held-out records together."""
        return dict(self.history[-1].pooled) if self.history else {}

    def bytes_per_site(self, direction: str) -> float:
        if not self.traffic:
            return 0.0
        return sum(t[direction] for t in self.traffic.values()) / len(self.traffic)


class Outcome(Protocol):
    """What every grid runner returns per cell: whether it completed, and why not."""

    @property
    def status(self) -> str: ...
    @property
    def error(self) -> str: ...


R = TypeVar("R", bound=Outcome)


class GridCell(Protocol):
    def label(self) -> str: ...


class Grid(Protocol):
    """What ``run_grid`` reads of an experiment: its name and the broker it names, if any."""

    @property
    def name(self) -> str: ...
    @property
    def broker(self) -> BrokerConfig | None: ...


C = TypeVar("C", bound=GridCell)


def run_grid(
    config: Grid,
    cells: list[C],
    run: Callable[[C, str, str], R],
    *,
    console: Console | None = None,
    on_result: Callable[[R], None] | None = None,
) -> list[R]:
    """``run(cell, broker_url, protocol)`` for every cell, on the experiment's broker (or one
    started here), with a progress bar; a failed cell is reported and the grid goes on."""
    console = console or Console(stderr=True)
    results = []
    with ExitStack() as stack:
        if config.broker is not None:
            url, protocol = config.broker.url, str(config.broker.protocol)
        else:
            broker = start_local_broker(stack)
            url, protocol = broker.url, broker.protocol
            console.print(f"broker: {broker.description}")
        with progress_bar(console) as progress:
            task = progress.add_task(config.name, total=len(cells))
            for cell in cells:
                progress.update(task, description=cell.label())
                result = run(cell, url, protocol)
                if result.status != "completed":
                    console.print(f"[red]{cell.label()} failed:[/red] {result.error}")
                results.append(result)
                if on_result is not None:
                    on_result(result)
                progress.advance(task)
    return results


def run_experiment(
    config: ExperimentConfig,
    *,
    console: Console | None = None,
    on_result: Callable[[CellResult], None] | None = None,
) -> list[CellResult]:
    def run(cell: Cell, url: str, protocol: str) -> CellResult:
        return run_cell(config, cell, url, protocol)

    return run_grid(config, config.cells(), run, console=console, on_result=on_result)


def run_cell(config: ExperimentConfig, cell: Cell, broker_url: str, protocol: str) -> CellResult:
    job = config.job_config(cell, broker_url, protocol)
    dataset = datasets.load(config.dataset, seed=cell.seed)
    shares = datasets.all_sites(dataset, cell.sites, cell.partition, seed=cell.seed)
    sites = dict(zip(job.sites, shares, strict=True))
    started = time.monotonic()
    result = CellResult(cell, "completed")
    late = 0
    try:
        if cell.mode == "centralized":
            result.history = run_centralized(job, sites)
        elif cell.mode == "local":
            result.history = run_local(job, sites)
        else:
            outcome = run_job(job, sites, connector_for(job), timeout=config.timeout_s)
            result.history = outcome.history
            result.traffic = {
                s: {"up": st.bytes_up, "down": st.bytes_down}
                for s, st in outcome.coordinator.sites.items()
            }
            late = outcome.coordinator.late_messages
    except CELL_FAILURES as exc:
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
    result.wall_time_s = time.monotonic() - started
    report = report_dict(
        job,
        result.history,
        result.traffic,
        result.wall_time_s,
        status=result.status,
        late_messages=late,
        mode=cell.mode if cell.mode in BASELINES else None,
    )
    report["partition"] = cell.partition
    if result.error:
        report["error"] = result.error
    write_report(job.output_dir, report)
    return result


def connector_for(job: JobConfig) -> Connector:
    # Every party needs its own client id, whatever the experiment's broker section says.
    return mqtt_connector(job.broker.model_copy(update={"client_id": None}))
