"""The Open Inference Protocol measured: ``medsplit serve`` against KServe's own ``ModelServer``
(the peer, ``bench/kserve_peer.py``) serving the same ONNX file, and onnxruntime called
in-process (the floor), in one run.

For the breast-cancer MLP and the CXR CNN: requests per second and p50/p99 latency of
single-row inference requests from 1, 8 and 32 concurrent clients, over REST (the binary
tensor extension, httpx) and gRPC (NVIDIA's tritonclient), each client a process of its own.
Both servers get the same clients, the same requests, the same onnxruntime thread count, and
answer ``logits`` only. Clients and servers share this machine's cores.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime
import tritonclient.grpc as triton_grpc

from tests.support.serve_process import KSERVE_PYTHON, free_port

CLIENTS = (1, 8, 32)
MODELS = {"mlp (EHR, 30 features)": "mlp-ehr", "cnn (CXR, 1x64x64)": "cnn-cxr"}
NAME = "model"
PEER = Path(__file__).with_name("kserve_peer.py")
Call = Callable[[], None]


@contextmanager
def _server(command: list[str], http_port: int) -> Iterator[None]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                url = f"http://127.0.0.1:{http_port}/v2/models/{NAME}/ready"
                if httpx.get(url).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[1]} did not become ready: {' '.join(command)}")
            time.sleep(0.2)
        yield
    finally:
        process.terminate()
        process.wait(30)


def _ours(model: Path, http_port: int, grpc_port: int, threads: int) -> list[str]:
    return [
        sys.executable, "-m", "medsplit", "serve", "--model", str(model), "--name", NAME,
        "--port", str(http_port), "--grpc-port", str(grpc_port), "--threads", str(threads),
    ]  # fmt: skip


def _peer(model: Path, http_port: int, grpc_port: int, threads: int) -> list[str]:
    return [
        str(KSERVE_PYTHON),
        str(PEER),
        str(model),
        NAME,
        str(http_port),
        str(grpc_port),
        str(threads),
    ]


def _rest_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """An infer request in the binary tensor extension: the JSON, then the raw FP32 input."""
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(x.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }
    document = json.dumps(header).encode()
    headers = {
        "Inference-Header-Content-Length": str(len(document)),
        "Content-Type": "application/octet-stream",
    }
    return document + raw, headers


def _rest_call(port: int, x: np.ndarray) -> Call:
    body, headers = _rest_body(x)
    url = f"http://127.0.0.1:{port}/v2/models/{NAME}/infer"
    client = httpx.Client(timeout=60)

    def call() -> None:
        answer = client.post(url, content=body, headers=headers)
        if answer.status_code != 200:
            raise RuntimeError(f"{url}: {answer.status_code} {answer.text[:200]}")

    return call


def _grpc_call(port: int, x: np.ndarray) -> Call:
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    outputs = [triton_grpc.InferRequestedOutput("logits")]

    def call() -> None:
        if client.infer(NAME, [tensor], outputs=outputs).as_numpy("logits") is None:
            raise RuntimeError("no logits in the answer")

    return call


CALLS = {"REST": _rest_call, "gRPC": _grpc_call}


def timed(call: Callable[[], object], times: int) -> list[float]:
    latencies = []
    for _ in range(times):
        began = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - began)
    return latencies


def _summary(latencies: list[float], elapsed: float) -> tuple[float, float, float]:
    """Requests per second, and p50 and p99 latency in ms."""
    every = sorted(latencies)
    p99 = every[min(len(every) - 1, int(0.99 * len(every)))]
    return len(every) / elapsed, statistics.median(every) * 1000, p99 * 1000


def _client_process(jobs: Any, start: Any, results: Any) -> None:
    """One client in a process of its own: for each job, connect, warm up, wait for the
    others, then time its requests. (Clients as threads of one process would measure that
    process's own GIL: the faster the server, the longer the client's tail.)"""
    while (job := jobs.get()) is not None:
        protocol, port, x, times = job
        call = CALLS[protocol](port, x)
        call()
        start.wait()
        results.put(timed(call, times))


class Clients:
    """``count`` client processes, kept for every measurement at that concurrency."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of grpc's threads
        self.start = context.Barrier(count + 1)
        self.results = context.Queue()
        self.jobs = [context.Queue() for _ in range(count)]
        self.processes = [
            context.Process(target=_client_process, args=(jobs, self.start, self.results))
            for jobs in self.jobs
        ]
        for process in self.processes:
            process.start()

    def measure(
        self, protocol: str, port: int, x: np.ndarray, times: int
    ) -> tuple[float, float, float]:
        for jobs in self.jobs:
            jobs.put((protocol, port, x, times))
        self.start.wait(timeout=300)  # every client connected and warmed up
        began = time.perf_counter()
        latencies = [t for _ in self.jobs for t in self.results.get(timeout=600)]
        return _summary(latencies, time.perf_counter() - began)

    def close(self) -> None:
        for jobs in self.jobs:
            jobs.put(None)
        for process in self.processes:
            process.join(30)


def _floor(
    model: Path, x: np.ndarray, clients: int, threads: int, times: int
) -> tuple[float, float, float]:
    """onnxruntime in this process: ``clients`` threads calling one session (it releases the
    GIL while it runs)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    def call() -> None:
        session.run(["logits"], {"input": x})

    call()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    workers = [
        threading.Thread(target=lambda out=out: out.extend(timed(call, times))) for out in latencies
    ]
    began = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return _summary([t for out in latencies for t in out], time.perf_counter() - began)


def _cell(result: tuple[float, float, float]) -> str:
    rate, p50, p99 = result
    return f"{rate:,.0f} ({p50:.1f} / {p99:.1f})"


def protocol_rows(
    models: dict[str, Path], shapes: dict[str, tuple[int, ...]], threads: int, quick: bool
) -> list[str]:
    """One row per model, protocol and client count."""
    rows = []
    for label, model in models.items():
        x = np.random.default_rng(0).standard_normal((1, *shapes[label])).astype(np.float32)
        ports = {side: (free_port(), free_port()) for side in ("ours", "peer")}
        (ours_http, ours_grpc), (peer_http, peer_grpc) = ports["ours"], ports["peer"]
        with (  # both up for the whole model: an idle server costs the other nothing
            _server(_ours(model, ours_http, ours_grpc, threads), ours_http),
            _server(_peer(model, peer_http, peer_grpc, threads), peer_http),
        ):
            for clients in CLIENTS:
                per_client = max(5, (40 if quick else 2000) // clients)
                floor = _floor(model, x, clients, threads, per_client)
                pool = Clients(clients)
                try:
                    for protocol in CALLS:
                        index = 0 if protocol == "REST" else 1
                        peer = pool.measure(protocol, ports["peer"][index], x, per_client)
                        ours = pool.measure(protocol, ports["ours"][index], x, per_client)
                        rows.append(
                            f"| {label} | {protocol} | {clients} | {_cell(floor)} | "
                            f"{_cell(ours)} | {_cell(peer)} | {ours[0] / peer[0]:.2f}x | "
                            f"{ours[2] / peer[2]:.2f}x |"
                        )
                        print(rows[-1], flush=True)
                finally:
                    pool.close()
    return rows


HEADER = [
    "Single-row inference requests, requests per second (p50 / p99 latency, ms), in one run:",
    "onnxruntime in-process (the floor), `medsplit serve` and KServe's `ModelServer` (the peer)",
    "serving the same ONNX file; REST with the binary tensor extension (httpx), gRPC with",
    "tritonclient, each client a process of its own (threads of one client process measure that",
    "process's GIL). Throughput ratio above 1 and p99 ratio below 1 favour medsplit.",
    "",
    "| model | protocol | clients | onnxruntime in-process | medsplit serve | KServe ModelServer | throughput medsplit / KServe | p99 medsplit / KServe |",
    "|---|---|---|---|---|---|---|---|",
]
