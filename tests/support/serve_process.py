"""A real ``medsplit serve`` process on free loopback ports, REST and gRPC, for the clients
nobody here wrote: ready once ``/v2/health/ready`` answers (waiting says for what), stopped
with SIGTERM."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

KSERVE_PYTHON = Path(sys.prefix) / "kserve" / "bin" / "python"  # scripts/setup.sh makes it
KSERVE_SIDE = Path(__file__).with_name("kserve_side.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Endpoints:
    url: str  # http://127.0.0.1:PORT, or https://localhost:PORT with TLS
    grpc: str  # HOST:PORT
    process: subprocess.Popen[str]


@contextmanager
def serve_process(
    model: Path, *args: str, verify: ssl.SSLContext | bool = True
) -> Iterator[Endpoints]:
    """``medsplit serve --model MODEL ARGS``; ``verify`` is how the readiness probe checks the
    server (an SSL context holding a client certificate under mutual TLS)."""
    port, grpc_port = free_port(), free_port()
    tls = "--tls-cert" in args
    host = "localhost" if tls else "127.0.0.1"
    command = [sys.executable, "-m", "medsplit", "serve", "--model", str(model)]
    command += ["--port", str(port), "--grpc-port", str(grpc_port), *args]
    scheme = "https" if tls else "http"
    # The log goes to a file, not a pipe nobody reads while the server runs (a full pipe blocks).
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stderr=log, text=True)
        endpoints = Endpoints(f"{scheme}://{host}:{port}", f"{host}:{grpc_port}", process)
        try:
            _await_ready(endpoints, verify, log)
            yield endpoints
        finally:
            process.terminate()
            process.wait(20)


def _await_ready(endpoints: Endpoints, verify: ssl.SSLContext | bool, log: IO[str]) -> None:
    deadline = time.monotonic() + 60
    while True:
        if endpoints.process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"medsplit serve exited: {log.read()}")
        try:
            if httpx.get(f"{endpoints.url}/v2/health/ready", verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"waited 60 s for {endpoints.url}/v2/health/ready"
        time.sleep(0.1)
