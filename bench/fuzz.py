"""Fuzzing the receive path: a million hostile frames against the decoder and reassembly.

A coverage-guided fuzzer (atheris, libFuzzer for Python) mutates real frames -- single-chunk
and multi-chunk messages, every kind of tensor payload -- and feeds each input to one
long-lived ``Decoder`` (so reassembly state builds up across inputs, as on a real connection),
split into up to four frames from four senders, then to the presence parser and the topic
parser. The contract under test: whatever the bytes, only ``WireError`` (or ``PresenceError``,
``ValueError`` for topics) comes out, and the reassembly buffer never exceeds its bound. Any
other exception, or a process over ``-rss_limit_mb``, is a crash and fails the run.

The fuzzer runs in a child process (libFuzzer exits when done); the parent reports inputs,
throughput and peak memory. Baseline for the throughput: decoding the seed frames without
mutation, in the same run.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import bench_main, machine

RUNS, QUICK_RUNS = 1_000_000, 50_000
RSS_LIMIT_MB = 2048
MAX_BUFFERED = 8 * 1024 * 1024


def _seeds(folder: Path) -> list[bytes]:
    import torch  # noqa: PLC0415

    from medsplit.wire import Envelope, WireLimits, encode  # noqa: PLC0415

    small = WireLimits(max_frame_bytes=4096)
    envelopes = [
        Envelope("job", "site-a", "activations", round=1, step=3, tensors={"h": torch.randn(4, 8)}),
        Envelope("job", "site-b", "done", meta={"samples": 10}, tensors={"w": torch.randn(2000)}),
        Envelope("job", "site-a", "hello", meta={"incarnation": "x"}),
        Envelope(
            "job", "site-c", "metrics", tensors={"y": torch.tensor([1, 0]), "z": torch.zeros(2)}
        ),
    ]
    frames = [f for env in envelopes for f in encode(env, limits=small)]
    frames += [b'{"party":"a","role":"site","state":"online","incarnation":"i","since":1}']
    for index, frame in enumerate(frames):
        (folder / f"seed-{index:03d}").write_bytes(frame)
    return frames


def _worker(corpus: str, runs: int) -> None:
    """The fuzzing process: libFuzzer drives ``one_input`` and exits when done."""
    import atheris  # noqa: PLC0415

    with atheris.instrument_imports():
        from medsplit.protocol import topics  # noqa: PLC0415 - instrumented
        from medsplit.protocol.presence import Presence, PresenceError  # noqa: PLC0415
        from medsplit.wire import Decoder, WireError, WireLimits  # noqa: PLC0415

    decoder = Decoder(
        WireLimits(max_frame_bytes=4096, max_message_bytes=4 * 1024 * 1024),
        max_buffered_bytes=MAX_BUFFERED,
        max_pending_per_sender=8,
        timeout_s=0.5,
    )

    def one_input(data: bytes) -> None:
        pieces = data.split(b"MSPL")[:4] if data.count(b"MSPL") > 1 else [data]
        for index, piece in enumerate(pieces):
            frame = piece if piece.startswith(b"MSPL") or len(pieces) == 1 else b"MSPL" + piece
            with contextlib.suppress(WireError):
                decoder.feed(frame, f"sender-{index}")
            decoder.expire()
            assert decoder.reassembler.buffered_bytes <= MAX_BUFFERED
        with contextlib.suppress(PresenceError):
            Presence.from_bytes(data)
        with contextlib.suppress(ValueError):
            topics.parse(data.decode("utf-8", "replace")[:300])

    atheris.Setup(
        [sys.argv[0], f"-runs={runs}", f"-rss_limit_mb={RSS_LIMIT_MB}", "-max_len=16384", corpus],
        one_input,
    )
    atheris.Fuzz()


def _baseline(frames: list[bytes], seconds: float = 2.0) -> float:
    """Seed frames decoded as they are, per second: what an unmutated input costs."""
    from medsplit.wire import Decoder, WireError  # noqa: PLC0415

    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        decoder = Decoder()
        for frame in frames:
            with contextlib.suppress(WireError):
                decoder.feed(frame)
            count += 1
    return count / (time.perf_counter() - started)


def run(quick: bool) -> str:
    runs = QUICK_RUNS if quick else RUNS
    with tempfile.TemporaryDirectory(prefix="medsplit-fuzz-") as corpus:
        frames = _seeds(Path(corpus))
        baseline = _baseline(frames)
        started = time.perf_counter()
        child = subprocess.run(
            [sys.executable, __file__, "--worker", corpus, str(runs)],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    done = re.search(r"Done (\d+) runs in (\d+) second", child.stderr)
    if child.returncode != 0 or done is None:
        sys.stderr.write(child.stderr[-5000:])
        raise SystemExit(f"the fuzzer found a crash or did not finish (exit {child.returncode})")
    inputs = int(done.group(1))
    coverage = re.findall(r"cov: (\d+)", child.stderr)
    rate = inputs / seconds
    return "\n".join(
        [
            "| inputs | crashes | seconds | inputs/s | seed decodes/s (baseline) | ratio | "
            "coverage (edges) | peak RSS |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {inputs:,} | 0 | {seconds:.0f} | {rate:,.0f} | {baseline:,.0f} | "
            f"{rate / baseline:.2f}x | {coverage[-1] if coverage else '?'} | {peak_mb:.0f} MB "
            f"(limit {RSS_LIMIT_MB} MB) |",
        ]
    )


def intro() -> str:
    return (
        "## Fuzzing the frame decoder\n\n"
        "`python bench/fuzz.py --write-docs` (atheris, coverage-guided; "
        f"{machine()}). Each input goes to one long-lived decoder as up to four frames from "
        "four senders, then to the presence and topic parsers; a crash is any exception other "
        "than the documented ones, or memory over the limit. The reassembly buffer is checked "
        f"against its bound ({MAX_BUFFERED // 2**20} MB) after every frame."
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], int(sys.argv[3]))
    else:
        bench_main("fuzz", __doc__, intro, run)
