"""The aggregator's memory before, during and after messages a site never finishes.

    python bench/reassembly_memory.py [--write-docs] [--quick]

A real ``medsplit aggregator`` process, waiting for its sites to join, behind a provisioned
Mosquitto with mutual TLS. A client holding a site's real certificate sends 16 messages of 120
frames of 256 KiB (the most one sender may have pending), each without its last frame, then
waits until the aggregator reports 16 reassembly timeouts (``waits.reassembly_timeout_s``: 3 s
here). The aggregator's resident size (VmRSS) is read before, sampled every 50 ms for the peak,
and read once they timed out: as it runs (the allocator tuned for message buffers, and the
freed heap handed back when messages are dropped), without handing it back
(``MEDSPLIT_MALLOC_RELEASE=off``: how it was before), and with glibc's own thresholds
(``MEDSPLIT_MALLOC_TUNING=off``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import bench_main, machine
from experiments.federation import Federation, small_job
from medsplit.brokers.embedded import start_local_broker
from medsplit.brokers.mosquitto import free_port
from tests.support.metrics import parse_samples
from tests.support.twin import Twin, abandon_messages

SITES = ["site-a", "site-b", "site-c"]


def _timeouts(http: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10) as response:
        samples = parse_samples(response.read().decode())
    rejected = samples.get("medsplit_messages_rejected_total", {})
    return rejected.get((("reason", "ReassemblyTimeout"),), 0)


def measure(workdir: Path, environment: dict[str, str]) -> tuple[float, float, float]:
    """(before, peak, after) MiB of one aggregator process run with ``environment``."""
    http = free_port()
    job = small_job("fedavg", "parallel", rounds=1) | {"sites": SITES}
    job |= {"http": {"port": http}, "waits": {"reassembly_timeout_s": 3}}
    os.environ.update(environment)
    with ExitStack() as stack:
        local = start_local_broker(stack, provision=(workdir / "pki", job["job_id"], SITES))
        if local.kits is None:
            raise SystemExit("this benchmark needs Mosquitto (scripts/setup.sh installs it)")
        (workdir / "fed").mkdir()
        fed = Federation(workdir / "fed", local.url, job, kits=local)
        stack.callback(fed.stop_all)
        aggregator = fed.start("aggregator")
        deadline = time.monotonic() + 60
        while True:  # until it serves /metrics
            try:
                _timeouts(http)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"the aggregator never served /metrics\n{fed.tail('aggregator')}"
                    ) from None
                time.sleep(0.2)
        time.sleep(2)  # settled after start-up: the "before" figure is not mid-import
        twin = Twin(local.kits, int(local.url.rsplit(":", 1)[1]), fed.job_id, "site-b")
        stack.callback(twin.close)

        def await_timeouts() -> None:
            while _timeouts(http) < 16:
                if aggregator.poll() is not None:
                    raise SystemExit(f"the aggregator exited\n{fed.tail('aggregator')}")
                time.sleep(0.2)

        return abandon_messages(twin, aggregator.pid, await_timeouts)


def run(quick: bool) -> str:
    lines = [
        "| aggregator | before | peak | after timeouts | after - before |",
        "|---|---|---|---|---|",
    ]
    runs: dict[str, dict[str, str]] = {
        "medsplit: tuned, freed heap given back": {},
        "tuned, not given back (MEDSPLIT_MALLOC_RELEASE=off)": {"MEDSPLIT_MALLOC_RELEASE": "off"},
        "glibc defaults (MEDSPLIT_MALLOC_TUNING=off)": {"MEDSPLIT_MALLOC_TUNING": "off"},
    }
    for label, environment in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            before, peak, after = measure(Path(tmp), environment)
        for name in environment:
            os.environ.pop(name)
        row = f"| {label} | {before:.0f} MiB | {peak:.0f} MiB | {after:.0f} MiB | {after - before:+.0f} MiB |"
        print(row, flush=True)
        lines.append(row)
    return "\n".join(lines)


def intro() -> str:
    return (
        "## Reassembly memory: messages a site never finishes\n\n"
        "Command: `python bench/reassembly_memory.py --write-docs`.\n"
        f"Machine: {machine()}. A real aggregator process behind Mosquitto with mutual TLS; a "
        "client with a site's certificate sends 16 messages of 120 frames of 256 KiB, each "
        "without its last frame (480 MB in all, the most one sender may have pending); the "
        "aggregator's VmRSS before, at the peak (sampled every 50 ms) and once all 16 timed "
        "out (`waits.reassembly_timeout_s: 3`)."
    )


if __name__ == "__main__":
    bench_main("reassembly_memory", __doc__, intro, run)
