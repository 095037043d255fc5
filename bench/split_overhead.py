"""Time per epoch of U-shaped split learning through Mosquitto against centralized training,
and where every millisecond of a split step goes.

    python bench/split_overhead.py [--write-docs] [--quick]

Same ``cnn`` on the same 64x64 synthetic-cxr images (one site holding all of them), batch 32,
same seed. Centralized training runs here; split-u runs as the real processes (``medsplit
aggregator`` and one ``medsplit agent``) through a Mosquitto started here, with fp32, fp16 and
int8 activations and gradients on the wire, over mutual TLS (as deployed) and plaintext.

Every wire runs unpipelined and pipelined (``training.micro_batches``), with the aggregator
and the agent sharing the machine's cores as they do on one box; fp32 also runs as on two
one-core machines (each process pinned to a core of its own, one thread), where the edge and
the trunk do not compete for a core and pipelining's overlap shows by itself. Each row also
shows its floor: the split's compute and codecs in core-milliseconds spread evenly over the
cores, what no schedule can beat on this machine.

Each pair is one centralized epoch measurement followed at once by one split job, so both see
the same machine load; pairs of every configuration are interleaved and repeated (three by
default), and the table shows the median ratio with its range. A split epoch is the
aggregator's training phase of a round, after a warm-up round.

The breakdown per step comes from the job's own accounting (report.json): the agent's compute
and the time it spent in cut-layer exchanges (of which its codec), and the aggregator's trunk
work and codec per message kind. What is left of an exchange once both codecs and the trunk are
taken out is the transport: paho, Mosquitto, the kernel and the threads handing each message on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import bench_main, machine
from edge_agent.data import datasets
from medsplit.brokers.embedded import LocalBroker, start_local_broker
from medsplit.brokers.mosquitto import Mosquitto
from medsplit.config import OptimizerConfig
from medsplit.ids import AGGREGATOR_ID
from medsplit.training import train_centralized
from models import cut_shapes, load_plan

PLAN = "cnn-cxr-u"
BATCH = 32
SITE = "site-1"
WIRE_DTYPES = ("float32", "float16", "int8")
PAIRS = 3
TARGETS = {"float32": 1.3, "float16": 1.2, "int8": 1.2}  # pipelined, sharing the cores
PIPELINED = 2  # micro-batches of the pipelined rows (the fastest on this machine)
CORES = len(os.sched_getaffinity(0))
UP_KINDS, DOWN_KINDS = ("activations", "trunk-grad"), ("trunk-out", "act-grad")


def centralized_epoch_seconds(data: datasets.SiteData, epochs: int = 2) -> float:
    """The median of ``epochs`` epochs after a warm-up one, in this process."""
    plan = load_plan(PLAN)
    torch.manual_seed(0)
    model = plan.model.build()
    times = []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        train_centralized(
            model,
            data.x_train,
            data.y_train,
            epochs=1,
            batch_size=BATCH,
            optimizer=OptimizerConfig(),
            seed=0,
            first_epoch=epoch,
        )
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


@dataclass(frozen=True)
class Config:
    wire_dtype: str
    tls: bool
    micro_batches: int = 1
    # As on two machines: the aggregator on core 0 and the agent on core 1, one thread each.
    own_cores: bool = False

    @property
    def label(self) -> str:
        pipelined = f", {self.micro_batches} micro-batches" if self.micro_batches > 1 else ""
        cores = ", a core each" if self.own_cores else ""
        return f"{self.wire_dtype}, {'mutual TLS' if self.tls else 'plaintext'}{pipelined}{cores}"


@dataclass(frozen=True)
class SplitRun:
    epoch_s: float
    per_step_ms: dict[str, float]  # the breakdown of one step


def _broker(stack: ExitStack, workdir: Path, job_id: str, tls: bool) -> LocalBroker:
    if tls:
        return start_local_broker(stack, provision=(workdir / "pki", job_id, [SITE]))
    mosquitto = stack.enter_context(Mosquitto(workdir / "broker"))
    return LocalBroker(mosquitto.url, "5", "plaintext")


def _configs(workdir: Path, job_id: str, broker: LocalBroker, config: Config, rounds: int) -> None:
    job = {
        "job_id": job_id,
        "plan": PLAN,
        "mode": "split-u",
        "orchestration": "sequential",
        "seed": 0,
        "sites": [SITE],
        "seal_segments": False,  # one site: nobody to seal to
        "dataset": "synthetic-cxr",
        "rounds": {"count": rounds + 1},
        "training": {
            "batch_size": BATCH,
            "wire_dtype": config.wire_dtype,
            "micro_batches": config.micro_batches,
        },
        "broker": broker.broker_section(AGGREGATOR_ID),
        "state": {"run_dir": str(workdir / "run")},
    }
    site = {
        "site_id": SITE,
        "job_id": job_id,
        "broker": broker.broker_section(SITE),
        "data": {
            "dataset": "synthetic-cxr",
            "partition": "iid",
            "num_sites": 1,
            "index": 0,
            "seed": 0,
        },
        "device": "cpu",
        "state": {"dir": str(workdir / "state")},
        "waits": {"hello_interval_s": 0.5},
    }
    (workdir / "job.yaml").write_text(yaml.safe_dump(job))
    (workdir / "site.yaml").write_text(yaml.safe_dump(site))


def placement(own_cores: bool, core: int) -> dict[str, Any]:
    """Popen arguments that put a process on ``core`` alone with one thread, as if the
    aggregator and the site were on separate one-core machines (Linux; ``own_cores`` only)."""
    if not own_cores:
        return {}
    return {
        "env": {**os.environ, "OMP_NUM_THREADS": "1"},
        "preexec_fn": lambda: os.sched_setaffinity(0, {core}),
    }


def split_run(workdir: Path, config: Config, rounds: int) -> SplitRun:
    """One split-u job as two processes; its epoch time and its per-step breakdown."""
    workdir.mkdir(parents=True)
    job_id = "bench-split"
    command = [sys.executable, "-m", "medsplit"]
    with ExitStack() as stack:
        broker = _broker(stack, workdir, job_id, config.tls)
        _configs(workdir, job_id, broker, config, rounds)
        log = stack.enter_context((workdir / "processes.log").open("w"))
        aggregator, agent = (
            subprocess.Popen(
                [*command, role, "--config", str(workdir / f"{name}.yaml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                **placement(config.own_cores, core),
            )
            for core, (role, name) in enumerate((("aggregator", "job"), ("agent", "site")))
        )
        if aggregator.wait(1800) != 0 or agent.wait(120) != 0:
            raise RuntimeError(f"split run failed; see {workdir / 'processes.log'}")
    report = json.loads((workdir / "run" / "report.json").read_text())
    epoch = statistics.median(h["train_seconds"] for h in report["history"][1:])
    return SplitRun(epoch, breakdown(report))


def breakdown(report: dict[str, object]) -> dict[str, float]:
    """Milliseconds per training step, by where they went, over every round of the job."""
    history = report["history"]
    assert isinstance(history, list)
    site = {"compute": 0.0, "exchange": 0.0, "codec": 0.0, "steps": 0.0}
    for record in history:
        for key, value in record["site_timings"][SITE].items():
            site[key] += value
    data_path = report["data_path"]
    assert isinstance(data_path, dict)
    trunk, codec = data_path["trunk"], data_path["codec_seconds"]
    encode_down = sum(codec.get(f"encode {kind}", 0.0) for kind in DOWN_KINDS)
    aggregator_codec = encode_down + sum(codec.get(f"decode {kind}", 0.0) for kind in UP_KINDS)
    # The trunk's handler encodes its answer too: that part is codec, not trunk compute.
    trunk_compute = sum(trunk[kind]["seconds"] for kind in UP_KINDS if kind in trunk) - encode_down
    steps = site["steps"]
    transport = site["exchange"] - site["codec"] - aggregator_codec - trunk_compute
    parts = {
        "edge compute": site["compute"],
        "edge codec": site["codec"],
        "trunk compute": trunk_compute,
        "aggregator codec": aggregator_codec,
        "transport": transport,
    }
    return {name: 1000 * seconds / steps for name, seconds in parts.items()}


@dataclass
class Pairs:
    ratios: list[float]
    splits: list[SplitRun]


def configurations() -> list[Config]:
    """Every wire and security unpipelined, then pipelined (``PIPELINED`` micro-batches),
    sharing the machine's cores; then fp32 as on two one-core machines, unpipelined and
    pipelined, where the edge and the trunk do not compete for a core."""
    shared = [
        Config(dtype, tls, micro)
        for micro in (1, PIPELINED)
        for tls, dtype in (
            (True, "float32"),
            (False, "float32"),
            (False, "float16"),
            (False, "int8"),
        )
    ]
    return [*shared, *(Config("float32", False, micro, own_cores=True) for micro in (1, 2, 4))]


def run(quick: bool) -> str:
    """``PAIRS`` interleaved pairs per configuration (one, with one measured round, if quick)."""
    rounds, pairs = (1, 1) if quick else (2, PAIRS)
    data = datasets.share("synthetic-cxr", "iid", 1, 0, seed=0)
    steps = -(-data.train_samples // BATCH)
    results = {c: Pairs([], []) for c in configurations()}
    centrals: list[float] = []
    centralized_epoch_seconds(data, epochs=1)  # warms this process up; not counted
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(pairs):
            for index, config in enumerate(results):
                central = centralized_epoch_seconds(data)
                split = split_run(Path(tmp) / f"{repeat}-{index}", config, rounds)
                centrals.append(central)
                results[config].ratios.append(split.epoch_s / central)
                results[config].splits.append(split)
                print(
                    f"pair {repeat + 1}/{pairs} {config.label}: centralized {central:.2f} s, "
                    f"split-u {split.epoch_s:.2f} s per epoch ({split.epoch_s / central:.2f}x)",
                    flush=True,
                )
    return table(results, centrals, steps, data.train_samples, pairs)


def floor_ms(parts: dict[str, float], config: Config) -> float:
    """The least a step can take: the split's compute and codecs in core-milliseconds (each
    part keeps its process's threads busy), spread evenly over the machine's cores. ``parts``
    come from an unpipelined run, whose parts do not overlap: a pipelined run's compute is
    measured while the other side competes for the cores."""
    threads = 1 if config.own_cores else torch.get_num_threads()
    work = sum(ms for name, ms in parts.items() if name != "transport")
    return work * threads / CORES


def _target(config: Config) -> str:
    if config.micro_batches == 1 or config.own_cores:
        return "baseline"
    return f"{TARGETS[config.wire_dtype]:.2f}x"


def table(
    results: dict[Config, Pairs], centrals: list[float], steps: int, samples: int, pairs: int
) -> str:
    central_ms = 1000 * statistics.median(centrals) / steps
    head_mb = 4 * torch.Size(cut_shapes(load_plan(PLAN), BATCH)["head_out"]).numel() / 1e6
    lines = [
        f"{samples} images, {steps} steps of {BATCH}; {pairs} interleaved pairs per row. "
        f"Centralized (all {CORES} cores): {central_ms:.1f} ms per step (median of the pairs, "
        f"{1000 * min(centrals) / steps:.1f}-{1000 * max(centrals) / steps:.1f}).",
        "",
        "| split-u, wire | vs centralized, median (range) | target | floor | ms per step |",
        "|---|---|---|---|---|",
    ]
    names = list(next(iter(results.values())).splits[0].per_step_ms)
    medians: dict[Config, dict[str, float]] = {}
    for config, result in results.items():
        ratios = result.ratios
        medians[config] = {
            n: statistics.median(s.per_step_ms[n] for s in result.splits) for n in names
        }
        step_ms = statistics.median(s.epoch_s for s in result.splits) * 1000 / steps
        target = _target(config)
        if target != "baseline":
            met = statistics.median(ratios) <= TARGETS[config.wire_dtype]
            target += ", met" if met else ", missed"
        # The same work unpipelined, each side alone on the machine's cores or its own.
        unpipelined = dataclasses.replace(config, micro_batches=1)
        floor = floor_ms(medians[unpipelined], config) / central_ms
        lines.append(
            f"| {config.label} | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | {target} | {floor:.2f}x | {step_ms:.1f} |"
        )
    lines += [
        "",
        "Where a split step goes, ms (median of the pairs; every round of each job). Pipelined, "
        "the parts overlap, so the transport -- what is left of the site's waits -- goes "
        "negative: that is the overlap.",
        "",
        f"| split-u, wire | {' | '.join(names)} | sum | centralized |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for config, parts in medians.items():
        cells = " | ".join(f"{parts[n]:.1f}" for n in names)
        lines.append(f"| {config.label} | {cells} | {sum(parts.values()):.1f} | {central_ms:.1f} |")
    lines += [
        "",
        f"Cut-layer activations per step: {head_mb:.1f} MB in fp32 (up), the same again as "
        "their gradient (down); fp16 halves them, int8 quarters them. Floor: the row's edge "
        f"and trunk compute and both codecs, unpipelined, in core-ms, over the {CORES} cores.",
    ]
    return "\n".join(lines)


def intro() -> str:
    return (
        "## Split learning overhead: split-u through Mosquitto vs centralized\n\n"
        "Command: `make bench` (runs `python bench/split_overhead.py --write-docs` after the "
        "transport benchmark).\n"
        f"Machine: {machine()}. The aggregator and the agent are separate processes "
        "(`medsplit aggregator`, `medsplit agent`) talking through Mosquitto on loopback; plan "
        "`cnn-cxr-u` (head: first conv block, tail: classifier), one site with all images. "
        "Edge compute: the site's own layers and optimizer; trunk compute: the aggregator's "
        "layers; codecs: encoding and decoding on each side; transport: the rest of each "
        "exchange (paho, Mosquitto, TLS, the kernel, thread hand-offs). Pipelined rows cut "
        "each batch into micro-batches whose passes overlap across the two processes "
        "(docs/split-learning.md); 'a core each' pins each process to a core of its own."
    )


if __name__ == "__main__":
    bench_main("split_overhead", __doc__, intro, run)
