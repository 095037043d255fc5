"""How long the ``medsplit`` command takes to answer when it needs no model: help, version, and a
config file with a typo, against the interpreter alone and against importing torch.

Before the shape issue every command imported torch (and scikit-learn, pydicom) first: ``--help``
took 3.8-9.8 s and a typo 5 s. Now packages resolve their names lazily and config files are
validated before anything heavy loads. Each command runs ``REPEATS`` times, interleaved with the
baselines, and the table shows the median and the ratio to ``import torch`` measured in the
same run.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    return "\n".join(rows)


def intro() -> str:
    return (
        "## Command start-up: answers that need no model\n\n"
        "`python bench/startup.py --write-docs` (in `make bench`), "
        f"{machine()}. Median of 9 runs each, interleaved. Target: `--help`, `--version` and "
        "config validation at most 0.5 s on this machine (they took 3.4-9.8 s before)."
    )


if __name__ == "__main__":
    bench_main("startup", __doc__, intro, run)
