"""Inference: onnxruntime against torch eager for the same weights, the HTTP service, and the
Open Inference Protocol against KServe's ModelServer (``bench/inference_protocol.py``).

    python bench/inference.py [--write-docs] [--quick]

For each built-in architecture (the demo's ``mlp``, ``cnn`` and a ``resnet18``), one set of
weights is exported with ``models.onnx_export`` and run both ways in this process with the same
number of threads: latency at batch 1 (p50 and p99 over many single calls) and throughput at
batch 32. Then ``medsplit serve`` runs as its own process and an HTTP client posts DICOM files
(``medsplit dicom-synth``, 64x64 and 512x512 sources) to ``/predict``, one request at a time and
from 4 client threads at once: requests per second end to end (upload, DICOM decoding, windowing,
resizing, onnxruntime, JSON answer), next to the same decoding and inference done in-process.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench._report import bench_main, machine
from bench.inference_protocol import HEADER as PROTOCOL_HEADER
from bench.inference_protocol import MODELS as PLANS_OIP
from bench.inference_protocol import protocol_rows, timed
from edge_agent.data.dicom import Preprocessing
from edge_agent.data.dicom_synth import synthesize_site
from edge_agent.data.inputs import DataCard, FeatureInput, ImageInput
from edge_agent.model_card import ModelCard
from edge_agent.serving.predictor import Predictor
from models import load_plan
from models.onnx_export import export_onnx
from tests.support.serve_process import serve_process

PLANS = {
    "mlp (EHR, 30 features)": "mlp-ehr",
    "cnn (1x64x64)": "cnn-cxr",
    "resnet18 (1x64x64)": "resnet18-cxr",
}
THREADS = torch.get_num_threads()


def _card(plan_name: str) -> ModelCard:
    plan = load_plan(plan_name)
    shape = plan.model.input_shape
    if len(shape) == 1:
        encoding: FeatureInput | ImageInput = FeatureInput(
            numeric=[f"f{i}" for i in range(shape[0])], mean=[0.0] * shape[0], std=[1.0] * shape[0]
        )
    else:
        encoding = ImageInput(preprocessing=Preprocessing(size=shape[-1]))
    data = DataCard(input=encoding, classes=["negative", "positive"])
    return ModelCard(job_id="bench", site_id="site-1", mode="fedavg", plan=plan, data=data)


def _export(plan_name: str, out: Path) -> tuple[torch.nn.Module, Path]:
    card = _card(plan_name)
    model = card.plan.model.build(seed=0).eval()
    sample = torch.randn(8, *card.input_shape)
    path = out / f"{plan_name}.onnx"
    path.write_bytes(export_onnx(model, sample, metadata=card.to_metadata()).data)
    return model, path


def _latencies(call: Callable[[], object], repeats: int) -> list[float]:
    for _ in range(max(10, repeats // 10)):  # warm up
        call()
    return timed(call, repeats)


def _p(times: list[float], q: float) -> float:
    return float(np.percentile(times, q)) * 1e3


def _eager_call(model: torch.nn.Module) -> Callable[[torch.Tensor], Callable[[], object]]:
    def bind(x: torch.Tensor) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode():
                return model(x)

        return call

    return bind


def _ort_call(
    session: onnxruntime.InferenceSession,
) -> Callable[[np.ndarray], Callable[[], object]]:
    return lambda x: lambda: session.run(["logits"], {"input": x})


def runtime_rows(out: Path, quick: bool) -> list[str]:
    rows = []
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = THREADS
    for label, plan_name in PLANS.items():
        model, path = _export(plan_name, out)
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        shape = load_plan(plan_name).model.input_shape
        heavy = "resnet" in plan_name
        repeats = 30 if quick else (200 if heavy else 1000)
        one, batch = torch.randn(1, *shape), torch.randn(32, *shape)
        one_np, batch_np = one.numpy(), batch.numpy()

        eager, ort = _eager_call(model), _ort_call(session)
        t1, o1 = _latencies(eager(one), repeats), _latencies(ort(one_np), repeats)
        tb, ob = _latencies(eager(batch), repeats // 4), _latencies(ort(batch_np), repeats // 4)
        t_rate, o_rate = 32 / statistics.median(tb), 32 / statistics.median(ob)
        rows.append(
            f"| {label} | {_p(t1, 50):.3f} / {_p(t1, 99):.3f} | {_p(o1, 50):.3f} / {_p(o1, 99):.3f} "
            f"| {_p(t1, 50) / _p(o1, 50):.2f}x | {t_rate:,.0f} | {o_rate:,.0f} | {o_rate / t_rate:.2f}x |"
        )
        print(rows[-1], flush=True)
    return rows


def _http_rate(url: str, body: bytes, requests: int, clients: int) -> float:
    """Requests per second of ``clients`` threads posting ``body`` to /predict."""
    per_client = max(1, requests // clients)

    def work() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(per_client):
                answer = client.post(
                    "/predict", content=body, headers={"Content-Type": "application/dicom"}
                )
                assert answer.status_code == 200, answer.text

    work()  # warm up, and check it answers
    threads = [threading.Thread(target=work) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return per_client * clients / (time.perf_counter() - started)


def http_rows(out: Path, quick: bool) -> list[str]:
    _, model = _export("cnn-cxr", out)
    predictor = Predictor(model, threads=THREADS)
    rows = []
    with serve_process(model, "--no-grpc") as up:
        url = up.url
        for size in (64, 512):
            folder = synthesize_site(out / f"dicom-{size}", 0, 4, seed=0, size=size)
            body = sorted(folder.glob("*.dcm"))[0].read_bytes()
            requests = 40 if quick else 400

            def in_process(body: bytes = body) -> object:
                return predictor.predict([predictor.from_file(body)])

            local = 1 / statistics.median(_latencies(in_process, requests))
            sequential = _http_rate(url, body, requests, 1)
            concurrent = _http_rate(url, body, requests, 4)
            rows.append(
                f"| {size}x{size} ({len(body) / 1024:.0f} KiB) | {local:,.0f} | {sequential:,.0f} "
                f"| {concurrent:,.0f} | {sequential / local:.2f}x | {concurrent / local:.2f}x |"
            )
            print(rows[-1], flush=True)
    return rows


def run(quick: bool) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        runtime = runtime_rows(Path(tmp), quick)
        http = http_rows(Path(tmp), quick)
        exported = {label: _export(PLANS_OIP[label], Path(tmp))[1] for label in PLANS_OIP}
        shapes = {label: load_plan(PLANS_OIP[label]).model.input_shape for label in PLANS_OIP}
        protocol = protocol_rows(exported, shapes, THREADS, quick)
    return "\n".join(
        [
            f"Latency (ms, p50 / p99) at batch 1 and throughput (samples/s) at batch 32, {THREADS} threads each:",
            "",
            "| model | torch eager p50 / p99 | onnxruntime p50 / p99 | p50 speed-up | torch batch 32 | onnxruntime batch 32 | throughput ratio |",
            "|---|---|---|---|---|---|---|",
            *runtime,
            "",
            "`POST /predict` with a DICOM upload to `medsplit serve` (cnn, its own process), requests per second:",
            "",
            "| DICOM source | in-process decode + inference | HTTP, 1 client | HTTP, 4 clients | 1 client / in-process | 4 clients / in-process |",
            "|---|---|---|---|---|---|",
            *http,
            "",
            *PROTOCOL_HEADER,
            *protocol,
        ]
    )


def intro() -> str:
    return (
        "## Inference: onnxruntime against torch, and the HTTP service\n\n"
        f"`python bench/inference.py --write-docs` on {machine()}, onnxruntime {onnxruntime.__version__}."
    )


if __name__ == "__main__":
    bench_main("inference", __doc__, intro, run)
