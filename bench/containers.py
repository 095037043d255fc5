"""What the containers cost: a cold image build against a rebuild after a code change, the
images' sizes, a container's start against the same command on the host, and the compose trial.

The Dockerfile installs the dependencies (torch included) in layers that only a change of
pyproject.toml or constraints.txt invalidates, and medsplit's own wheel last, so a code change
rebuilds one small layer per image. Before that ordering, any change reinstalled every extra and
copied the whole environment again: 72 s for both images instead of 8-12 s (measured while
building the Dockerfile). Start-up rows are medians of interleaved runs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import bench_main, machine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from experiments.compose_demo import down, prepare, up, wait_for_aggregator  # noqa: E402

MEDSPLIT = str(Path(sys.executable).with_name("medsplit"))


def _timed(command: list[str], **kwargs: object) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
    return time.perf_counter() - started


def _wheelhouse() -> Path:
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "wheelhouse.sh")],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def _build(wheelhouse: Path, *extra: str) -> float:
    seconds = 0.0
    for target in ("aggregator", "edge"):
        seconds += _timed([
            "docker", "build", "--quiet", "--network", "host", *extra,
            "-f", str(REPO / "docker" / "Dockerfile"), "--target", target,
            "-t", f"medsplit-{target}:latest", str(wheelhouse),
        ])  # fmt: skip
    return seconds


def _forget_images() -> None:
    for target in ("aggregator", "edge"):
        listed = subprocess.run(
            ["docker", "images", "--quiet", f"medsplit-{target}"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        if listed.stdout.split():
            subprocess.run(
                ["docker", "rmi", "--force", *set(listed.stdout.split())],
                check=True,
                capture_output=True,
            )
    subprocess.run(["docker", "image", "prune", "--force"], check=True, capture_output=True)
    subprocess.run(
        ["docker", "builder", "prune", "--all", "--force"], check=False, capture_output=True
    )


def _size_mb(image: str) -> float:
    out = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Size}}", image],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return int(out.stdout) / 1e6


def run(quick: bool) -> str:
    subprocess.run(["bash", str(REPO / "scripts" / "images.sh")], check=True, capture_output=True)
    wheelhouse = _wheelhouse()
    _forget_images()  # a first build: the base images stay, nothing of ours is cached
    cold = _build(wheelhouse)
    (REPO / "medsplit" / "__init__.py").touch()
    warm = _build(_wheelhouse())  # a new medsplit wheel: what a code change rebuilds
    repeats = 3 if quick else 7
    host, container = [], []
    for _ in range(repeats):  # interleaved
        host.append(_timed([MEDSPLIT, "--version"]))
        container.append(
            _timed(["docker", "run", "--rm", "--network", "host", "--read-only",
                    "medsplit-aggregator:latest", "--version"])
        )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trial = prepare(Path(tmp) / "trial", rounds=3, per_site=32, project=f"bench-{os.getpid()}")
        started = time.perf_counter()
        try:
            up(trial)
            ready = time.perf_counter() - started
            code = wait_for_aggregator(trial, 900)
            total = time.perf_counter() - started
        finally:
            down(trial)
        job_s = json.loads(trial.report.read_text())["wall_time_s"] if code == 0 else float("nan")
    h, c = statistics.median(host), statistics.median(container)
    rows = [
        "| measure | figure | ratio |",
        "|---|---|---|",
        f"| first build of both images (from the wheelhouse, nothing cached) | {cold:.1f} s | 1.00x |",
        f"| rebuild both after a code change | {warm:.1f} s | {warm / cold:.2f}x |",
        f"| medsplit-aggregator image | {_size_mb('medsplit-aggregator:latest'):.0f} MB | |",
        f"| medsplit-edge image (DICOM stack, onnxruntime, server) | {_size_mb('medsplit-edge:latest'):.0f} MB | |",
        f"| `medsplit --version` on the host (median) | {h:.2f} s | 1.00x |",
        f"| the same in a container, `docker run --rm --read-only` | {c:.2f} s | {c / h:.2f}x |",
        f"| compose trial: `up` until the agents start (health-gated) | {ready:.1f} s | |",
        f"| compose trial: 2 sites, 3 rounds split-u, DICOM, end to end | {total:.1f} s | |",
        f"| of which the job itself (report.json wall_time_s) | {job_s:.1f} s | |",
    ]
    return "\n".join(rows)


def intro() -> str:
    return (
        "## Containers: builds, start-up and the compose trial\n\n"
        "`python bench/containers.py --write-docs` (in `make bench`; needs Docker: it runs "
        f"`make images` first), {machine()}. Builds use the legacy builder of Debian's docker.io "
        "20.10 with host networking; the base images are the debootstrapped stand-ins."
    )


if __name__ == "__main__":
    bench_main("containers", __doc__, intro, run)
