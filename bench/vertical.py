"""What vertical split learning costs: aligning the parties by PSI, and training through Mosquitto.

    python bench/vertical.py [--write-docs] [--quick]

**Alignment.** Two parties holding N patient keys each, 80% of them common. The baseline is
the insecure way to find the common patients: each party salts and hashes its keys
(``salted_keys``, as in a job) and one side intersects the two lists of hashes -- which hands
that side every hash of the other. Against it, the whole private set intersection a job runs
(``edge_agent.alignment``: OpenMined's ECDH PSI, the label party as the client, then the
common keys encrypted for the parties), relayed stage by stage in one process as the
aggregator relays it, so the table shows the cryptography and the bytes, not the broker. Both
are timed back to back on the same keys; the ratio is PSI over the baseline.

**Training.** A vertical job of two and three parties over breast-cancer (the U-shaped
arrangement, the parties aligned by PSI first) runs through a Mosquitto started here, every
party on its own client and thread as in ``medsplit experiment``; the baseline is the same
network trained centrally on the joined table for the same epochs, measured just before. The
ratio is the job's wall time (alignment included) over the centralized time.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import ParamSpec, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.alignment import relay_in_process
from bench._report import bench_main, machine
from edge_agent.alignment import PartyAlignment, common_key, job_salt, salted_keys
from experiments.inprocess import run_job
from experiments.runner import connector_for
from experiments.vertical import builtin_tables, centralized, joined, party_names
from experiments.vertical_experiment import VerticalExperiment
from medsplit.brokers.embedded import start_local_broker

SECRET = b"a secret the parties share, 32 bytes"
JOB = "bench-vertical"
OVERLAP = 0.8


def _keys(count: int, offset: int) -> list[str]:
    return [f"MRN{i:08d}" for i in range(offset, offset + count)]


def _plain(first: list[str], second: list[str]) -> int:
    """The baseline: both lists salted and hashed, intersected in the clear."""
    salt = job_salt(SECRET, JOB)
    mine = salted_keys(first, salt, column="mrn", source="label")
    theirs = set(salted_keys(second, salt, column="mrn", source="other"))
    return sum(1 for key in mine if key in theirs)


def _psi(first: list[str], second: list[str]) -> tuple[int, int]:
    """The job's alignment of the two parties: how many are common, and the bytes relayed."""
    salt, sealing = job_salt(SECRET, JOB), common_key(SECRET, JOB)
    sides = {
        party: PartyAlignment(
            party,
            "label",
            ["other"],
            salted_keys(keys, salt, column="mrn", source=party),
            keys,
            sealing=sealing,
        )
        for party, keys in (("label", first), ("other", second))
    }
    relayed = relay_in_process(sides, "label")
    return len(sides["other"].common), relayed


P = ParamSpec("P")
T = TypeVar("T")


def _timed(run: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> tuple[float, T]:
    begun = time.perf_counter()
    result = run(*args, **kwargs)
    return time.perf_counter() - begun, result


def alignment(quick: bool) -> str:
    sizes = (1_000, 5_000) if quick else (1_000, 10_000, 50_000)
    repeats = 1 if quick else 3
    lines = [
        "| keys per party | common | plain intersection s | PSI s | PSI / plain | "
        "PSI MB relayed | plain MB (hashes sent) |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        first = _keys(size, 0)
        second = _keys(size, round(size * (1 - OVERLAP)))
        plain_s, psi_s, relayed, common = [], [], 0, 0
        for _ in range(repeats):
            seconds, found = _timed(_plain, first, second)
            plain_s.append(seconds)
            seconds, (common, relayed) = _timed(_psi, first, second)
            psi_s.append(seconds)
            assert common == found, (common, found)
        plain, psi = statistics.median(plain_s), statistics.median(psi_s)
        lines.append(
            f"| {size:,} | {common:,} | {plain:.3f} | {psi:.2f} | {psi / plain:.0f}x | "
            f"{relayed / 1e6:.2f} | {size * 32 / 1e6:.2f} |"
        )
    return "\n".join(lines)


def training(quick: bool) -> str:
    rounds = 2 if quick else 10
    lines = [
        "| parties | rounds | centralized s | vertical job s | job / centralized | "
        "MB up per party per round |",
        "|---|---|---|---|---|---|",
    ]
    with ExitStack() as stack:
        broker = start_local_broker(stack)
        experiment = VerticalExperiment(name="bench-vertical", rounds=rounds, seeds=[0])
        for count in (2, 3):
            names = party_names(count)
            job = experiment.job(count, 0, True, broker.url)
            tables = builtin_tables(names, coverage=0.9, seed=0)
            # The centralized baseline needs the aligned rows: a first job provides them.
            warm = run_job(job, tables, connector_for(job), timeout=600)
            data = {party: agent.data for party, agent in warm.agents.items()}
            central_s, _ = _timed(centralized, job, joined(data, names))
            job_s, outcome = _timed(run_job, job, tables, connector_for(job), timeout=600)
            up = [e.bytes_up for e in outcome.coordinator.sites.values()]
            lines.append(
                f"| {count} | {rounds} | {central_s:.2f} | {job_s:.2f} | "
                f"{job_s / central_s:.0f}x | {statistics.mean(up) / rounds / 1e6:.2f} |"
            )
    return "\n".join(lines)


def run(quick: bool) -> str:
    return (
        "**Alignment** (two parties, 80% of the keys common; median of "
        f"{1 if quick else 3})\n\n{alignment(quick)}\n\n"
        f"**Training** (breast-cancer, U-shaped, batch 32)\n\n{training(quick)}"
    )


def intro() -> str:
    return (
        "## Vertical split learning: PSI alignment and training through Mosquitto\n\n"
        "```bash\npython bench/vertical.py --write-docs\n```\n\n"
        f"{machine()}. {__doc__.split(chr(10) + chr(10), 1)[1].strip()}"
    )


if __name__ == "__main__":
    bench_main("vertical", __doc__, intro, run)
