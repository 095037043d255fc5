"""Train, export at ``finish``, serve over HTTP on uvicorn, query like a hospital system would."""

from __future__ import annotations

import io
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import pydicom.data
import pytest
import torch

from edge_agent.data import datasets
from edge_agent.data.dicom import Preprocessing, read_image
from edge_agent.data.dicom_source import DicomData, load_dicom_site
from edge_agent.data.dicom_synth import synthesize
from edge_agent.data.inputs import ImageInput
from edge_agent.serving.app import Limits
from edge_agent.serving.predictor import Predictor, ProviderUnavailable, providers_for
from edge_agent.serving.server import ServeOptions, await_model, build_service
from edge_agent.site_model import load_site_model
from experiments.inprocess import run_job
from medsplit.cli import main
from medsplit.transport import MemoryBroker
from medsplit.wiring import memory_connector
from tests.support.certs import CertificateAuthority
from tests.support.configs import job_config
from tests.support.serve_process import serve_process

CNN = {"name": "cnn", "args": {"image_size": 32, "channels": [8, 16], "hidden": 32}}
PREPROCESSING = Preprocessing(size=32, mean=0.3, std=0.25)


def _train(tmp: Path, job: dict[str, Any], data: dict[str, datasets.SiteData]) -> Path:
    """A one-round job whose agents export their models at finish; site-1's state dir."""
    base = {"job_id": "job-serve", "rounds": 1, "sites": list(data), "batch_size": 16}
    config = job_config({**base, **job})
    broker = MemoryBroker()
    result = run_job(
        config,
        data,
        memory_connector(broker),
        state_root=tmp / "state",
        export_onnx=True,
    )
    for agent in result.agents.values():
        assert agent.onnx_model is not None and agent.onnx_model.is_file()
    return tmp / "state" / "site-1"


@pytest.fixture(scope="module")
def image_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A split-u CNN trained on generated DICOM folders: (state dir, site-1's DICOM folder)."""
    tmp = tmp_path_factory.mktemp("image")
    folders = synthesize(tmp / "dicom", 2, 24, seed=1, size=48)
    data = {}
    for index, folder in enumerate(folders):
        config = DicomData(folder=folder, classes=["normal", "lesion"], preprocessing=PREPROCESSING)
        data[f"site-{index + 1}"] = load_dicom_site(config)[0]
    job = {"plan": {"model": CNN, "cut": "conv1", "tail_cut": "fc"}, "mode": "split-u"}
    return _train(tmp, job, data), folders[0]


@pytest.fixture(scope="module")
def table_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLOP MLP on breast-cancer: site-1's state dir."""
    shares = datasets.all_sites(datasets.load("breast-cancer"), 2, "iid", seed=0)
    data = {"site-1": shares[0], "site-2": shares[1]}
    return _train(tmp_path_factory.mktemp("table"), {"plan": "mlp-ehr", "mode": "flop"}, data)


@contextmanager
def serving(model: Path, limits: Limits = Limits(), **options: Any) -> Iterator[httpx.Client]:
    """uvicorn in a thread on a socket bound to a free loopback port (HTTPS when ``options``
    name TLS files; the client then uses the ``verify`` SSL context)."""
    verify = options.pop("verify", True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    service = build_service(ServeOptions(model=model, limits=limits, **options))
    server = service.http
    thread = threading.Thread(target=service.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # uvicorn sets it once it accepts connections
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = sock.getsockname()[1]
    scheme = "https" if "tls_cert" in options else "http"
    base = f"{scheme}://localhost:{port}" if scheme == "https" else f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30, verify=verify) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _trained_preprocessing(state_dir: Path) -> Preprocessing:
    """The site's preprocessing as training saw it: its own, then the federation's statistics."""
    _, card = load_site_model(state_dir / "site-model.safetensors")
    assert isinstance(card.data.input, ImageInput)
    return card.data.input.preprocessing


def _torch_probabilities(state_dir: Path, x: torch.Tensor) -> torch.Tensor:
    model, _ = load_site_model(state_dir / "site-model.safetensors")
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)


def test_dicom_uploads_are_answered_as_the_trained_model_would(
    image_site: tuple[Path, Path],
) -> None:
    state_dir, folder = image_site
    files = sorted(folder.glob("*.dcm"))[:3]
    trained = _trained_preprocessing(state_dir)
    # The statistics round folded the federation's mean and std into the site's preprocessing.
    assert (trained.size, trained.window) == (PREPROCESSING.size, PREPROCESSING.window)
    assert (trained.mean, trained.std) != (PREPROCESSING.mean, PREPROCESSING.std)
    expected = _torch_probabilities(state_dir, torch.stack([read_image(f, trained) for f in files]))
    with serving(state_dir / "model.onnx") as client:
        answer = client.post(
            "/predict",
            content=files[0].read_bytes(),
            headers={"Content-Type": "application/dicom"},
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert list(body["probabilities"]) == ["normal", "lesion"]
        got = torch.tensor(list(body["probabilities"].values()))
        torch.testing.assert_close(got, expected[0], atol=1e-5, rtol=0)
        assert body["class"] == ["normal", "lesion"][int(expected[0].argmax())]
        assert body["model"]["site_id"] == "site-1"

        uploads = [("files", (f.name, f.read_bytes(), "application/dicom")) for f in files]
        batch = client.post("/predict/batch", files=uploads)
        assert batch.status_code == 200, batch.text
        rows = [list(p["probabilities"].values()) for p in batch.json()["predictions"]]
        torch.testing.assert_close(torch.tensor(rows), expected, atol=1e-5, rtol=0)

        # One multipart file works on /predict too, and so does a real CT of another size.
        single = client.post("/predict", files=[uploads[1]])
        assert single.json()["probabilities"] == batch.json()["predictions"][1]["probabilities"]
        ct = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
        assert (
            client.post("/predict", files={"file": ("ct.dcm", ct.read_bytes())}).status_code == 200
        )

        # An image already preprocessed elsewhere, as JSON.
        image = read_image(files[2], trained)[0].tolist()
        as_json = client.post("/predict", json={"image": image})
        assert as_json.status_code == 200
        assert as_json.json()["probabilities"] == batch.json()["predictions"][2]["probabilities"]

        health = client.get("/healthz")
        assert health.json() == {"status": "ok"}
        meta = client.get("/metadata").json()
        assert meta["input_shape"] == [1, 32, 32] and meta["classes"] == ["normal", "lesion"]
        assert meta["preprocessing"]["preprocessing"] == trained.model_dump(mode="json")
        assert meta["providers"] == ["CPUExecutionProvider"] and meta["opset"] == 18
        metrics = client.get("/metrics").text
        assert 'medsplit_inference_requests_total{endpoint="predict",status="200"} 4.0' in metrics
        assert "medsplit_inference_predictions_total 7.0" in metrics  # 1 + 3 + 1 + 1 + 1


def test_bad_requests_get_4xx_answers_that_say_what_was_wrong(
    image_site: tuple[Path, Path],
) -> None:
    state_dir, folder = image_site
    dicom = sorted(folder.glob("*.dcm"))[0].read_bytes()
    truncated = Path(pydicom.data.get_testdata_file("MR_truncated.dcm")).read_bytes()
    odd = pydicom.dcmread(io.BytesIO(dicom))
    odd.WindowWidth = 0  # a header the VOI LUT cannot use
    buffer = io.BytesIO()
    odd.save_as(buffer)
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        (
            "/predict",
            {"content": b"hello", "headers": {"Content-Type": "application/dicom"}},
            422,
            "not a DICOM file",
        ),
        (
            "/predict",
            {"content": truncated, "headers": {"Content-Type": "application/dicom"}},
            422,
            "truncated",
        ),
        (
            "/predict",
            {"content": buffer.getvalue(), "headers": {"Content-Type": "application/dicom"}},
            422,
            "window width must be positive",
        ),
        (
            "/predict",
            {"content": dicom[:1000], "headers": {"Content-Type": "application/dicom"}},
            422,
            "upload",
        ),
        (
            "/predict",
            {"json": {"features": [1.0, 2.0]}},
            422,
            "this model takes images [1, 32, 32]",
        ),
        (
            "/predict",
            {"json": {"image": [[0.0] * 16] * 16}},
            422,
            "expected a preprocessed image of shape [1, 32, 32]",
        ),
        ("/predict", {"json": {"image": [[0.0] * 32] * 32, "record": {}}}, 422, "exactly one of"),
        (
            "/predict",
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
            "not valid JSON",
        ),
        (
            "/predict",
            {"content": b"", "headers": {"Content-Type": "application/dicom"}},
            400,
            "empty request body",
        ),
        (
            "/predict",
            {"content": b"x", "headers": {"Content-Type": "text/plain"}},
            415,
            "unsupported Content-Type 'text/plain'",
        ),
        (
            "/predict",
            {"files": [("a", ("a.dcm", dicom)), ("b", ("b.dcm", dicom))]},
            400,
            "multipart",
        ),
        ("/predict/batch", {"json": {"instances": []}}, 422, "non-empty list"),
        (
            "/predict/batch",
            {"json": {"instances": [{"image": [[0.0] * 32] * 32}] * 3}},
            413,
            "limit is 2",
        ),
        (
            "/predict/batch",
            {"content": dicom, "headers": {"Content-Type": "application/dicom"}},
            415,
            "multipart/form-data",
        ),
        (
            "/predict",
            {"content": b"x" * 40_000, "headers": {"Content-Type": "application/dicom"}},
            413,
            "limit is 32768",
        ),
    ]
    with serving(state_dir / "model.onnx", Limits(max_body_bytes=32_768, max_batch=2)) as client:
        for path, request, status, message in cases:
            answer = client.post(path, **request)
            assert answer.status_code == status, (path, message, answer.text)
            assert message in answer.json()["error"], (message, answer.json())
        assert client.get("/healthz").status_code == 200  # nothing above hurt the service
        metrics = client.get("/metrics").text
        assert 'medsplit_inference_requests_total{endpoint="predict",status="422"} 7.0' in metrics


def test_feature_vectors_and_records_are_answered(table_site: Path) -> None:
    _, card = load_site_model(table_site / "site-model.safetensors")
    raw = datasets.load("breast-cancer").x[:4]
    encoding = card.data.input
    expected = _torch_probabilities(
        table_site, torch.stack([encoding.from_vector(r.tolist()) for r in raw])
    )
    names = list(datasets.load("breast-cancer").feature_names)
    with serving(table_site / "model.onnx") as client:
        vector = client.post("/predict", json={"features": raw[0].tolist()})
        assert vector.status_code == 200, vector.text
        got = torch.tensor(list(vector.json()["probabilities"].values()))
        torch.testing.assert_close(got, expected[0], atol=1e-5, rtol=0)
        assert list(vector.json()["probabilities"]) == ["malignant", "benign"]

        record = dict(zip(names, raw[1].tolist(), strict=True))
        instances = [
            {"record": record},
            {"features": raw[2].tolist()},
            {"features": raw[3].tolist()},
        ]
        batch = client.post("/predict/batch", json={"instances": instances})
        assert batch.status_code == 200, batch.text
        rows = [list(p["probabilities"].values()) for p in batch.json()["predictions"]]
        torch.testing.assert_close(torch.tensor(rows), expected[1:], atol=1e-5, rtol=0)

        short = client.post("/predict", json={"features": raw[0].tolist()[:29]})
        assert short.status_code == 422
        assert "expected 30 values (mean radius, mean texture" in short.json()["error"]
        bad = client.post(
            "/predict/batch",
            json={"instances": [{"features": raw[0].tolist()}, {"record": {"age": 3}}]},
        )
        assert (
            bad.status_code == 422
            and "instances[1].record: unknown column(s) ['age']" in bad.json()["error"]
        )
        dicom = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
        image = client.post(
            "/predict", content=dicom, headers={"Content-Type": "application/dicom"}
        )
        assert (
            image.status_code == 422
            and "takes a feature vector (30 values)" in image.json()["error"]
        )
        assert client.get("/metadata").json()["features"] == names


def test_hostile_bodies_are_refused_without_hurting_the_service(table_site: Path) -> None:
    boundary = "medsplit-test-boundary"

    def chunked_upload() -> Iterator[bytes]:  # no Content-Length: the limit must still hold
        yield f"--{boundary}\r\nContent-Disposition: form-data; name=f; filename=a.dcm\r\n\r\n".encode()
        for _ in range(64):
            yield b"\0" * 65_536  # 4 MB against a 1 MB limit

    limits = Limits(max_body_bytes=1024 * 1024)
    with serving(table_site / "model.onnx", limits) as client:
        nested = client.post(
            "/predict", content=b"[" * 200_000, headers={"Content-Type": "application/json"}
        )
        assert nested.status_code == 400 and "nested too deeply" in nested.json()["error"]
        upload = client.post(
            "/predict",
            content=chunked_upload(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert upload.status_code == 413 and "limit of 1048576" in upload.json()["error"]
        assert upload.json()["reason"] == HTTPStatus(413).phrase.lower()
        assert client.get("/healthz").status_code == 200
        # Unknown paths and methods answer the same {"error", "reason"} shape.
        missing, wrong = client.get("/predictions"), client.get("/predict")
        assert (missing.status_code, wrong.status_code) == (404, 405)
        assert missing.json() == {"error": "GET /predictions: Not Found", "reason": "not found"}
        assert wrong.json()["reason"] == "method not allowed"


def test_inference_clients_can_be_required_to_present_a_certificate(
    table_site: Path, tmp_path: Path
) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    server, client_id = ca.issue("localhost", server=True), ca.issue("ehr-system")
    tls = {"tls_cert": server.cert, "tls_key": server.key, "tls_client_ca": ca.ca_file}
    with_certificate = ssl.create_default_context(cafile=ca.ca_file)
    with_certificate.load_cert_chain(client_id.cert, client_id.key)
    anonymous = ssl.create_default_context(cafile=ca.ca_file)
    with serving(table_site / "model.onnx", verify=with_certificate, **tls) as client:
        answer = client.post("/predict", json={"features": [0.0] * 30})
        assert answer.status_code == 200 and answer.json()["class"] in ("benign", "malignant")
    with serving(table_site / "model.onnx", verify=anonymous, **tls) as client:
        refused = client.post("/predict", json={"features": [0.0] * 30})
        assert refused.status_code == 401 and "client certificate" in refused.json()["reason"]
        assert client.get("/healthz").status_code == 200  # the kubelet shows no certificate


def test_the_serve_command_runs_uvicorn_and_refuses_what_it_cannot_serve(
    table_site: Path, tmp_path: Path
) -> None:
    with serve_process(table_site / "model.onnx") as up:
        answer = httpx.post(f"{up.url}/predict", json={"features": [0.0] * 30})
    assert answer.status_code == 200
    assert set(answer.json()["probabilities"]) == {"malignant", "benign"}
    (tmp_path / "plain.onnx").write_bytes(b"not onnx")
    for model, message in [("none.onnx", "no such model file"), ("plain.onnx", "cannot load it")]:
        refused = subprocess.run(
            [sys.executable, "-m", "medsplit", "serve", "--model", str(tmp_path / model)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_cuda_is_used_only_when_it_is_there() -> None:
    assert providers_for("cpu", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert providers_for("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider"
    ]
    with pytest.raises(ProviderUnavailable, match=r"no CUDAExecutionProvider.*onnxruntime-gpu"):
        providers_for("cuda", ["CPUExecutionProvider"])


def test_await_model_waits_for_the_job_then_checks_the_model(
    table_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A serving pod's init container: it waits until the agent writes model.onnx (atomically,
    as the agent does), then proves it loads; a deadline turns into one clear line."""
    target = tmp_path / "state" / "model.onnx"
    loaded: list[Predictor] = []
    waiter = threading.Thread(target=lambda: loaded.append(await_model(target, every_s=0.05)))
    waiter.start()
    target.parent.mkdir()
    shutil.copyfile(table_site / "model.onnx", tmp_path / "state" / ".model.onnx.part")
    os.replace(tmp_path / "state" / ".model.onnx.part", target)
    waiter.join(60)
    assert loaded and loaded[0].card.site_id == "site-1"
    assert main(["await-model", "--model", str(tmp_path / "never.onnx"), "--timeout", "0.2"]) == 2
    assert "never.onnx: not written within 0.2 s" in capsys.readouterr().err
