"""How long the ``medsplit`` command takes to answer when it needs no model: help, version, and a
config file with a typo, against the interpreter alone and against importing torch; and how long
the two processes take to be connected and waiting, and what an idle agent holds.

Before the shape issue every command imported torch (and scikit-learn, pydicom) first: ``--help``
took 3.8-9.8 s and a typo 5 s. Now packages resolve their names lazily and config files are
validated before anything heavy loads. Each command runs ``REPEATS`` times, interleaved with the
baselines, and the table shows the median and the ratio to ``import torch`` measured in the
same run.

**Processes** (issue 32): ``medsplit aggregator`` and ``medsplit agent`` (a site reading a CSV
table) started against a Mosquitto on loopback, timed until the agent's transport logs "connected to"
(it has loaded its data by then) and the aggregator logs that it is online (its probe for a
live aggregator done, connected, subscribed); both then wait. Interleaved with ``python -c "import
torch"`` run to completion; the agent's and a torch-only interpreter's resident memory one second
later. Targets: both within 1.5x of importing torch; the idle agent within torch's RSS + 100 MB.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _report import bench_main, machine

MEDSPLIT = str(Path(sys.executable).with_name("medsplit"))
TYPO_JOB = "job_id: j\nplan: mlp-ehr-u\nsites: [a]\nroundz: 3\n"
TYPO_SITE = "site_id: a\njob_id: j\nstate_dir: /tmp/x\n"


def _seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, check=False)
    return time.perf_counter() - started


def run(quick: bool) -> str:
    repeats = 3 if quick else 9
    with tempfile.TemporaryDirectory() as tmp:
        job, site = Path(tmp) / "job.yaml", Path(tmp) / "site.yaml"
        job.write_text(TYPO_JOB)
        site.write_text(TYPO_SITE)
        commands = {
            "python -c pass (interpreter floor)": [sys.executable, "-c", "pass"],
            "python -c 'import torch' (what every command paid before)": [
                sys.executable,
                "-c",
                "import torch",
            ],
            "medsplit --version": [MEDSPLIT, "--version"],
            "medsplit --help": [MEDSPLIT, "--help"],
            "medsplit aggregator --config (a typo)": [MEDSPLIT, "aggregator", "--config", str(job)],
            "medsplit agent --config (a moved field)": [MEDSPLIT, "agent", "--config", str(site)],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        _seconds(commands["medsplit --help"])  # warm the file cache
        for _ in range(repeats):
            for name, command in commands.items():  # interleaved: drift hits every row alike
                times[name].append(_seconds(command))
    torch_s = statistics.median(times["python -c 'import torch' (what every command paid before)"])
    rows = ["| command | median s | min-max s | / import torch |", "|---|---|---|---|"]
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append(
            f"| {name} | {median:.3f} | {min(samples):.3f}-{max(samples):.3f} | "
            f"{median / torch_s:.2f}x |"
        )
    return "\n".join(rows) + "\n\n" + processes(repeats)


AGENT = """site_id: a
job_id: startup
broker: {{url: "mqtt://127.0.0.1:{port}", insecure: true}}
data: {{source: csv, path: {table}, label_column: label, classes: ["0", "1"], numeric: [age, dose]}}
state: {{dir: {state}}}
http: {{port: 0}}
"""
AGGREGATOR = """job_id: startup
plan: mlp-ehr
mode: fedavg
sites: [a]
broker: {{url: "mqtt://127.0.0.1:{port}", insecure: true}}
state: {{run_dir: {run}}}
http: {{port: 0}}
"""


def _until_connected(command: list[str], marker: str) -> tuple[float, float]:
    """Seconds until the process logs ``marker`` (connected, waiting), and its RSS (MB) a
    second later."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:  # the process's own log says when it is connected
        if marker in line:
            break
    else:
        raise RuntimeError(f"{command} exited before connecting (status {process.wait()})")
    seconds = time.perf_counter() - started
    time.sleep(1.0)  # idle: what it holds while waiting, not while starting
    rss = psutil.Process(process.pid).memory_info().rss / 2**20
    process.terminate()
    process.wait(30)
    return seconds, rss


def _torch_interpreter() -> tuple[float, float]:
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys, torch; print('ready', flush=True); sys.stdin.read()"],
        stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    process.stdout.readline()
    seconds = time.perf_counter() - started
    rss = psutil.Process(process.pid).memory_info().rss / 2**20
    process.kill()
    process.wait()
    return seconds, rss


def processes(repeats: int) -> str:
    from medsplit.brokers.mosquitto import Mosquitto  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        broker = Mosquitto(folder / "broker").start()
        table = folder / "records.csv"
        table.write_text("age,dose,label\n" + "".join(f"{i},{i % 5},{i % 2}\n" for i in range(200)))
        agent, job = folder / "site.yaml", folder / "job.yaml"
        agent.write_text(AGENT.format(port=broker.port, table=table, state=folder / "state"))
        job.write_text(AGGREGATOR.format(port=broker.port, run=folder / "run"))
        runs: dict[str, list[tuple[float, float]]] = {"torch": [], "agent": [], "aggregator": []}
        try:
            for _ in range(repeats):
                runs["torch"].append(_torch_interpreter())
                agent_run = [MEDSPLIT, "agent", "--config", str(agent)]
                runs["agent"].append(_until_connected(agent_run, "connected to"))
                aggregator_run = [MEDSPLIT, "aggregator", "--config", str(job), "--fresh"]
                runs["aggregator"].append(_until_connected(aggregator_run, "online (epoch"))
        finally:
            broker.stop()
    torch_s = statistics.median(s for s, _ in runs["torch"])
    torch_mb = statistics.median(m for _, m in runs["torch"])
    rows = [
        "| process | connected and waiting, median s | / import torch | idle RSS MB | - torch's RSS |",
        "|---|---|---|---|---|",
        f"| python -c 'import torch' | {torch_s:.2f} | 1.00x | {torch_mb:.0f} | 0 |",
    ]
    for name in ("agent", "aggregator"):
        seconds = statistics.median(s for s, _ in runs[name])
        mb = statistics.median(m for _, m in runs[name])
        rows.append(
            f"| medsplit {name} | {seconds:.2f} | {seconds / torch_s:.2f}x | {mb:.0f} | "
            f"+{mb - torch_mb:.0f} |"
        )
    return "\n".join(rows)


def intro() -> str:
    return (
        "## Command start-up: answers that need no model\n\n"
        "`python bench/startup.py --write-docs` (in `make bench`), "
        f"{machine()}. Median of 9 runs each, interleaved. Target: `--help`, `--version` and "
        "config validation at most 0.5 s on this machine (they took 3.4-9.8 s before). "
        "Processes: the agent (a CSV site) until connected with its data loaded, the aggregator "
        "until online, against a torch-only interpreter until it has imported torch (not its "
        "exit, which costs another 0.2 s); targets 1.5x and torch's RSS + 100 MB. Before issue "
        "32 the agent's entry point alone took 1.97x and the agent held 358 MB: every data "
        "source, scikit-learn, pandas, pydicom, Pillow, onnx and onnxruntime loaded whatever the "
        "site read."
    )


if __name__ == "__main__":
    bench_main("startup", __doc__, intro, run)
