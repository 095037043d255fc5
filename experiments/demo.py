"""``medsplit demo``: a whole federation on one machine, each party its own OS process.

It starts a broker (Mosquitto with mutual TLS from a throw-away ``medsplit provision`` in
RUN/pki, or the one given with ``--broker``), writes a job config and one
site config per hospital into the run directory (real, editable files: the same ones a
deployment uses), starts ``medsplit aggregator`` and one ``medsplit agent`` per site, shows
progress, and prints the per-site results when the job ends. Each site exports its own model
to ``RUN/state/SITE/model.onnx`` when the job finishes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from experiments.demo_options import DemoOptions
from experiments.progress import progress_bar
from experiments.table_plans import dataset_plan, plan_family
from medsplit.brokers.embedded import LocalBroker, start_local_broker
from medsplit.brokers.mosquitto import free_port
from medsplit.ids import AGGREGATOR_ID
from medsplit.modes import SPLIT_MODES
from medsplit.security.seal_kit import sealing_files
from medsplit.storage import atomic_write
from models.config_errors import ConfigError


def write_configs(
    options: DemoOptions, job_id: str, site_ids: list[str], broker: LocalBroker
) -> tuple[Path, list[Path]]:
    """The job config and one site config per hospital, as files a deployment would use."""
    options.out.mkdir(parents=True, exist_ok=True)
    factory = demo_plan_factory(options)
    job = {
        "job_id": job_id,
        "plan": str(options.plan)
        if options.plan
        else dataset_plan(options.dataset, plan_family(options.mode)),
        "mode": options.mode,
        "orchestration": options.orchestration,
        "seed": options.seed,
        "sites": site_ids,
        "dataset": options.dataset,
        "rounds": {"count": options.rounds},
        "training": {
            "batch_size": options.batch_size,
            "optimizer": {"name": "adam", "lr": options.lr},
            "wire_dtype": options.wire_dtype,
        },
        "broker": broker.broker_section(AGGREGATOR_ID),
        "state": {"run_dir": str(options.out.resolve())},
        "http": {"port": options.http_port or free_port()},
    }
    # Split modes seal the sites' segments: the provisioned keys, or a kit made for this run.
    sealing = (
        sealing_files(broker.kits, options.out.resolve(), job_id, site_ids)
        if options.mode in SPLIT_MODES
        else None
    )
    if sealing is not None:
        job["security"] = {"roster_file": str(sealing.roster_file)}
    job_path = options.out / "job.yaml"
    atomic_write(job_path, yaml.safe_dump(job, sort_keys=False).encode())
    site_paths = []
    for index, site in enumerate(site_ids):
        site_cfg = {
            "site_id": site,
            "job_id": job_id,
            "broker": broker.broker_section(site),
            "data": {
                "source": "builtin",
                "dataset": options.dataset,
                "partition": options.partition,
                "num_sites": options.sites,
                "index": index,
                "seed": options.seed,
            },
            "device": "cpu",
            "state": {"dir": str((options.out / "state" / site).resolve())},
        }
        if sealing is not None:
            site_cfg["sealing"] = sealing.site_section(site)
        if factory is not None:  # the demo owns its sites: they run the plan's own code
            site_cfg["models"] = {"allow": [factory]}
        path = options.out / f"{site}.yaml"
        atomic_write(path, yaml.safe_dump(site_cfg, sort_keys=False).encode())
        site_paths.append(path)
    return job_path, site_paths


def demo_plan_factory(options: DemoOptions) -> str | None:
    """The ``--plan`` file's model factory, once the plan is checked against the dataset:
    its input shape, its segments recomposing the model, each segment exporting to ONNX."""
    if options.plan is None:
        return None
    from edge_agent.data.datasets import load  # noqa: PLC0415
    from models import load_plan  # noqa: PLC0415
    from models.plan_check import check_plan  # noqa: PLC0415

    plan = load_plan(options.plan)
    shape = load(options.dataset).input_shape
    if tuple(plan.model.input_shape) != tuple(shape):
        raise ConfigError(
            str(options.plan),
            [
                (
                    "model.input_shape",
                    f"{list(plan.model.input_shape)}, but {options.dataset} "
                    f"samples are {list(shape)}",
                )
            ],
        )
    check_plan(plan)
    return plan.model.factory


def run_demo(options: DemoOptions) -> int:
    console = Console(stderr=True)
    with ExitStack() as stack:
        job_id = f"demo-{uuid.uuid4().hex[:8]}"
        site_ids = [f"hospital-{i + 1}" for i in range(options.sites)]
        broker = _broker(options, stack, console, job_id, site_ids)
        job_path, site_paths = write_configs(options, job_id, site_ids, broker)
        logs = options.out / "logs"
        logs.mkdir(exist_ok=True)
        console.print(
            f"run directory: {options.out}  ({options.sites} sites, {options.mode}, {options.orchestration}, {options.dataset})"
        )
        port = yaml.safe_load(job_path.read_text())["http"]["port"]
        console.print(
            f"status page: http://127.0.0.1:{port}/  (also /status, /metrics; in a terminal: "
            f"medsplit status --url http://127.0.0.1:{port})"
        )
        processes = _start(job_path, site_paths, logs, stack)
        report = _follow(processes[0], options, console)
        code = _wait_all(processes, options.timeout, console)
    if report is None:
        console.print(f"[red]the job did not complete[/red]; logs are in {logs}")
        return code or 1
    print_results(report, console)
    _print_models(options.out, report["sites"], console)
    return code


def _broker(
    options: DemoOptions, stack: ExitStack, console: Console, job_id: str, sites: list[str]
) -> LocalBroker:
    """The broker given (plaintext: the flag says so), or a local Mosquitto with mutual TLS
    from a throw-away federation in RUN/pki, or the embedded one."""
    if options.broker is not None:
        broker = LocalBroker(options.broker, "5", f"{options.broker} (given; plaintext)")
    else:
        pki = options.out / "pki"
        if pki.exists():  # a previous demo's: its CA is not this job's
            shutil.rmtree(pki)
        broker = start_local_broker(
            stack, embedded=options.embedded_broker, provision=(pki, job_id, sites)
        )
    console.print(f"broker: {broker.description}")
    return broker


def _start(
    job_path: Path, site_paths: list[Path], logs: Path, stack: ExitStack
) -> list[subprocess.Popen[str]]:
    command = [sys.executable, "-m", "medsplit"]
    aggregator_log = stack.enter_context((logs / "aggregator.log").open("w"))
    processes = [
        subprocess.Popen(
            [*command, "aggregator", "--config", str(job_path), "--events"],
            stdout=subprocess.PIPE,
            stderr=aggregator_log,
            text=True,
        )
    ]
    for path in site_paths:
        log_file = stack.enter_context((logs / f"{path.stem}.log").open("w"))
        processes.append(
            subprocess.Popen(
                [*command, "agent", "--config", str(path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    stack.callback(_terminate, processes)
    return processes


def _follow(
    aggregator: subprocess.Popen[str], options: DemoOptions, console: Console
) -> dict[str, Any] | None:
    """Show the aggregator's progress events; return the report once it finished."""
    assert aggregator.stdout is not None
    with progress_bar(console) as progress:
        joining = progress.add_task("sites joined", total=options.sites)
        rounds = progress.add_task("rounds", total=options.rounds)
        for line in aggregator.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "joined":
                progress.advance(joining)
            elif event.get("event") == "round":
                accuracy = event["mean"].get("accuracy")
                label = (
                    f"rounds (mean accuracy {accuracy:.3f})" if accuracy is not None else "rounds"
                )
                progress.update(rounds, advance=1, description=label)
            elif event.get("event") == "finished":
                report_path = Path(event["run_dir"]) / "report.json"
                report: dict[str, Any] = json.loads(report_path.read_text())
                return report if event.get("status") == "completed" else None
    return None


def _wait_all(processes: list[subprocess.Popen[str]], timeout: float, console: Console) -> int:
    deadline = time.monotonic() + timeout
    code = 0
    for process in processes:
        try:
            returncode = process.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            console.print(f"[red]process {process.pid} did not exit in time[/red]")
            returncode = 1
        code = code or returncode
    return code


def _terminate(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def print_results(report: dict[str, Any], console: Console) -> None:
    final = report["final"]
    table = Table(
        title=f"{report['mode']} / {report['orchestration']} on {report['dataset']}, after {report['rounds']} rounds"
    )
    for column in ("site", "test samples", "accuracy", "AUROC", "loss", "MB up", "MB down"):
        table.add_column(column, justify="right" if column != "site" else "left")
    for site in report["sites"]:
        metrics = final["sites"].get(site, {})
        traffic = report["bytes"].get(site, {})
        table.add_row(
            site,
            str(metrics.get("samples", "-")),
            _fmt(metrics.get("accuracy")),
            _fmt(metrics.get("auroc")),
            _fmt(metrics.get("loss")),
            f"{traffic.get('up', 0) / 1e6:.2f}",
            f"{traffic.get('down', 0) / 1e6:.2f}",
        )
    mean = final["mean"]
    table.add_row(
        "mean",
        "",
        _fmt(mean.get("accuracy")),
        _fmt(mean.get("auroc")),
        _fmt(mean.get("loss")),
        "",
        "",
        style="bold",
    )
    Console().print(table)
    console.print(
        f"wall time {report['wall_time_s']:.1f} s; report.html (for a person), report.json, "
        "curves.png and model.safetensors are in the run directory"
    )


def _print_models(out: Path, sites: list[str], console: Console) -> None:
    """Where each site's exported model is, and how to serve one."""
    models = [out / "state" / site / "model.onnx" for site in sites]
    present = [m for m in models if m.is_file()]
    for model in models:
        console.print(
            f"model of {model.parent.name}: {model if model in present else 'not exported (see its log)'}"
        )
    if present:
        console.print(
            f"serve one: medsplit serve --model {present[0]} --port 8080   (docs/inference.md)"
        )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
