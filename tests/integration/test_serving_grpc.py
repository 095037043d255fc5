"""``medsplit serve``'s Open Inference Protocol over gRPC, called in a real ``medsplit serve``
process by NVIDIA's ``tritonclient[grpc]`` and by the protocol's generated stub: health,
metadata, Triton's model config with the model card, inference from raw and typed tensors,
table records and DICOM files (equal to onnxruntime's own output), every refusal with its
status code, and mutual TLS on both ports."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from edge_agent.serving.predictor import Predictor
from tests.integration.test_serving_http import image_site, table_site
from tests.support.certs import CertificateAuthority
from tests.support.serve_process import serve_process

pytestmark = pytest.mark.integration
__all__ = ["image_site", "table_site"]

MODEL = "model"


def _input(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def _refusal(server: triton.InferenceServerClient, model: str, tensor: triton.InferInput) -> str:
    with pytest.raises(InferenceServerException) as refused:
        server.infer(model, [tensor])
    return f"{refused.value.status()} {refused.value.message()}"


def test_tritonclient_calls_a_serve_process_over_grpc(table_site: Path) -> None:
    predictor = Predictor(table_site / "model.onnx")
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    record = json.dumps(dict.fromkeys(predictor.describe()["features"], 0.5)).encode()
    with (
        serve_process(table_site / "model.onnx", "--max-batch", "8", "--max-body-mb", "1") as up,
        triton.InferenceServerClient(up.grpc) as server,
    ):
        assert server.is_server_live() and server.is_server_ready()
        assert server.is_model_ready(MODEL) and server.is_model_ready(MODEL, "1")
        assert server.get_server_metadata().name == "medsplit"
        meta = server.get_model_metadata(MODEL)
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("input", "FP32", [-1, 30]),
            ("record", "BYTES", [-1]),
        ]
        config = server.get_model_config(MODEL).config
        assert config.max_batch_size == 8 and list(config.input[0].dims) == [30]
        assert json.loads(config.parameters["classes"].string_value) == predictor.classes
        assert json.loads(config.parameters["model_card"].string_value)["site_id"] == "site-1"

        result = server.infer(MODEL, [_input(x.numpy())], request_id="r-1")
        assert result.get_response().id == "r-1"
        np.testing.assert_allclose(result.as_numpy("logits"), predictor.logits(x), rtol=1e-6)
        np.testing.assert_allclose(
            result.as_numpy("probabilities"), predictor.probabilities(x), rtol=1e-5
        )
        only = server.infer(
            MODEL, [_input(x.numpy())], outputs=[triton.InferRequestedOutput("probabilities")]
        )
        assert only.as_numpy("logits") is None and only.as_numpy("probabilities").shape == (4, 2)
        by_record = server.infer(
            MODEL, [_input(np.array([record], dtype=np.object_), "record", "BYTES")]
        )
        own = predictor.probabilities(predictor.from_json({"record": json.loads(record)})[None])
        np.testing.assert_allclose(by_record.as_numpy("probabilities"), own, rtol=1e-5)

        zeros = np.zeros((1, 30), dtype=np.float32)
        assert "NOT_FOUND" in _refusal(server, "nope", _input(zeros))
        assert "unknown model 'nope'" in _refusal(server, "nope", _input(zeros))
        refused = _refusal(server, MODEL, _input(zeros[:, :29]))
        assert "INVALID_ARGUMENT" in refused and "shape [1, 29]; expected [-1, 30]" in refused
        refused = _refusal(server, MODEL, _input(zeros.astype(np.int64), datatype="INT64"))
        assert "datatype 'INT64'; expected 'FP32'" in refused
        refused = _refusal(server, MODEL, _input(np.zeros((9, 30), dtype=np.float32)))
        assert "RESOURCE_EXHAUSTED" in refused and "9 rows; the limit is 8" in refused
        refused = _refusal(server, MODEL, _input(np.zeros((8, 40000), dtype=np.float32)))
        assert "RESOURCE_EXHAUSTED" in refused  # 1.3 MB against --max-body-mb 1
        refused = _refusal(
            server, MODEL, _input(np.array([b"{no"], dtype=np.object_), "record", "BYTES")
        )
        assert "record[0]: not a JSON object" in refused
        assert server.is_server_live()  # refusals leave the service running


def test_typed_contents_and_dicom_files_over_the_protocol_stub(
    table_site: Path, image_site: tuple[Path, Path]
) -> None:
    """The protocol's own generated stub, sending tensors as typed ``contents`` rather than
    ``raw_input_contents``, and DICOM files as BYTES."""
    predictor = Predictor(table_site / "model.onnx")
    x = torch.randn(2, 30, generator=torch.Generator().manual_seed(4))
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=[2, 30]).contents.fp32_contents.extend(
        x.reshape(-1).tolist()
    )
    with (
        serve_process(table_site / "model.onnx") as up,
        grpc.insecure_channel(up.grpc) as channel,
    ):
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    logits = next(i for i, o in enumerate(answer.outputs) if o.name == "logits")
    values = np.frombuffer(answer.raw_output_contents[logits], dtype="<f4").reshape(2, 2)
    np.testing.assert_allclose(values, predictor.logits(x), rtol=1e-6)

    state, folder = image_site
    files = sorted(folder.glob("*.dcm"))[:2]
    images = Predictor(state / "model.onnx")
    expected = images.probabilities(torch.stack([images.from_file(f.read_bytes()) for f in files]))
    dicom = np.array([f.read_bytes() for f in files], dtype=np.object_)
    with (
        serve_process(state / "model.onnx") as up,
        triton.InferenceServerClient(up.grpc) as server,
    ):
        result = server.infer(MODEL, [_input(dicom, "dicom", "BYTES")])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5)


def test_mutual_tls_guards_both_ports(table_site: Path, tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    server_id, client_id = ca.issue("localhost", server=True), ca.issue("clinic-app")
    with_certificate = ssl.create_default_context(cafile=ca.ca_file)
    with_certificate.load_cert_chain(client_id.cert, client_id.key)
    anonymous = ssl.create_default_context(cafile=ca.ca_file)
    tls = ["--tls-cert", str(server_id.cert), "--tls-key", str(server_id.key)]
    tls += ["--tls-client-ca", str(ca.ca_file)]
    x = np.zeros((1, 30), dtype=np.float32)
    with serve_process(table_site / "model.onnx", *tls, verify=with_certificate) as up:
        answer = httpx.post(
            f"{up.url}/v2/models/{MODEL}/infer",
            json={
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 30], "data": [0.0] * 30}
                ]
            },
            verify=with_certificate,
        )
        assert answer.status_code == 200
        refused = httpx.post(f"{up.url}/v2/models/{MODEL}/infer", json={}, verify=anonymous)
        assert refused.status_code == 401 and "client certificate" in refused.json()["reason"]
        assert httpx.get(f"{up.url}/v2/health/ready", verify=anonymous).status_code == 200

        trusted = {"ssl": True, "root_certificates": str(ca.ca_file)}
        with triton.InferenceServerClient(
            up.grpc,
            **trusted,
            private_key=str(client_id.key),
            certificate_chain=str(client_id.cert),
        ) as server:
            assert server.infer(MODEL, [_input(x)]).as_numpy("logits").shape == (1, 2)
        with (
            triton.InferenceServerClient(up.grpc, **trusted) as server,
            pytest.raises(InferenceServerException, match="UNAVAILABLE"),
        ):
            server.infer(MODEL, [_input(x)], client_timeout=20)
        with (
            triton.InferenceServerClient(up.grpc) as server,  # plaintext to a TLS port
            pytest.raises(InferenceServerException, match="UNAVAILABLE"),
        ):
            server.is_server_live(client_timeout=20)
