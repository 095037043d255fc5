"""``medsplit serve`` speaking the Open Inference Protocol (KServe V2) over REST: health,
metadata with the model card, inference from prepared tensors, table records and DICOM files
(answers equal onnxruntime's in-process output and ``/predict``'s), and every refusal."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.serving.app import Limits
from edge_agent.serving.predictor import Predictor
from tests.integration.test_serving_http import image_site, serving, table_site

pytestmark = pytest.mark.integration
__all__ = ["image_site", "table_site"]  # the fixtures, shared with the /predict tests

MODEL = "model"  # the ONNX file's stem


def _fp32(x: torch.Tensor) -> dict[str, object]:
    return {
        "name": "input",
        "datatype": "FP32",
        "shape": list(x.shape),
        "data": x.reshape(-1).tolist(),
    }


def test_health_and_metadata_carry_the_model_card(table_site: Path) -> None:
    predictor = Predictor(table_site / "model.onnx")
    with serving(table_site / "model.onnx") as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").json() == {"ready": True}
        assert client.get("/v2").json()["name"] == "medsplit"
        for path in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1"):
            meta = client.get(path).json()
            assert meta["name"] == MODEL and meta["versions"] == ["1"]
            assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 30]}
            assert meta["inputs"][1] == {"name": "record", "datatype": "BYTES", "shape": [-1]}
            assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities"]
            assert json.loads(meta["parameters"]["classes"]) == predictor.classes
            card = json.loads(meta["parameters"]["model_card"])
            assert (
                card["site_id"] == "site-1" and card["features"] == predictor.describe()["features"]
            )
        assert client.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}


def test_prepared_tensors_are_answered_as_onnxruntime_answers_them(table_site: Path) -> None:
    predictor = Predictor(table_site / "model.onnx")
    x = torch.randn(5, 30, generator=torch.Generator().manual_seed(0))
    expected = predictor.logits(x)
    with serving(table_site / "model.onnx") as client:
        answer = client.post(
            f"/v2/models/{MODEL}/infer", json={"id": "r-1", "inputs": [_fp32(x)]}
        ).json()
        nested = _fp32(x) | {"data": x.tolist()}  # row-major nested data is the same tensor
        only = client.post(
            f"/v2/models/{MODEL}/versions/1/infer",
            json={"inputs": [nested], "outputs": [{"name": "probabilities"}]},
        ).json()
    assert answer["id"] == "r-1" and answer["model_name"] == MODEL
    logits = next(o for o in answer["outputs"] if o["name"] == "logits")
    assert logits["shape"] == [5, 2] and logits["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(logits["data"]).reshape(5, 2), expected, rtol=1e-6)
    assert [o["name"] for o in only["outputs"]] == ["probabilities"]
    np.testing.assert_allclose(
        np.array(only["outputs"][0]["data"]).reshape(5, 2),
        predictor.probabilities(x),
        rtol=1e-5,
    )


def test_records_and_dicom_files_are_prepared_as_predict_prepares_them(
    table_site: Path, image_site: tuple[Path, Path]
) -> None:
    predictor = Predictor(table_site / "model.onnx")
    features = predictor.describe()["features"]
    record = {name: float(i) / 10 for i, name in enumerate(features)}
    with serving(table_site / "model.onnx") as client:
        oip = client.post(
            f"/v2/models/{MODEL}/infer",
            json={
                "inputs": [
                    {
                        "name": "record",
                        "datatype": "BYTES",
                        "shape": [1],
                        "data": [json.dumps(record)],
                    }
                ],
                "outputs": [{"name": "probabilities"}],
            },
        ).json()
        own = client.post("/predict", json={"record": record}).json()
    assert oip["outputs"][0]["data"] == pytest.approx(list(own["probabilities"].values()))

    state, folder = image_site
    files = sorted(folder.glob("*.dcm"))[:3]
    with serving(state / "model.onnx") as client:
        oip = client.post(
            f"/v2/models/{MODEL}/infer",
            json={
                "inputs": [
                    {
                        "name": "dicom",
                        "datatype": "BYTES",
                        "shape": [3],
                        "data": [base64.b64encode(f.read_bytes()).decode() for f in files],
                    }
                ],
                "outputs": [{"name": "probabilities"}],
            },
        ).json()
        own = [
            client.post(
                "/predict", content=f.read_bytes(), headers={"Content-Type": "application/dicom"}
            ).json()
            for f in files
        ]
    rows = np.array(oip["outputs"][0]["data"]).reshape(3, -1)
    for row, answer in zip(rows, own, strict=True):
        assert row.tolist() == pytest.approx(list(answer["probabilities"].values()))


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v2/models/other/infer", {"inputs": []}, 404, "unknown model 'other'"),
        (f"/v2/models/{MODEL}/versions/2/infer", {"inputs": []}, 404, "has no version '2'"),
        (
            f"/v2/models/{MODEL}/infer",
            {
                "inputs": [
                    {"name": "input", "datatype": "INT64", "shape": [1, 30], "data": [0] * 30}
                ]
            },
            400,
            "datatype 'INT64'; expected 'FP32'",
        ),
        (
            f"/v2/models/{MODEL}/infer",
            {
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 29], "data": [0.0] * 29}
                ]
            },
            400,
            "shape [1, 29]; expected [-1, 30]",
        ),
        (
            f"/v2/models/{MODEL}/infer",
            {
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 30], "data": [0.0] * 3}
                ]
            },
            400,
            "3 values for shape [1, 30]",
        ),
        (
            f"/v2/models/{MODEL}/infer",
            {
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [9, 30], "data": [0.0] * 270}
                ]
            },
            413,
            "9 rows; the limit is 8",
        ),
        (
            f"/v2/models/{MODEL}/infer",
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [0.0]}]},
            400,
            "unknown input 'pixels'",
        ),
        (
            f"/v2/models/{MODEL}/infer",
            {"inputs": [{"name": "record", "datatype": "BYTES", "shape": [1], "data": ["{no"]}]},
            400,
            "record[0]: not a JSON object",
        ),
        (
            f"/v2/models/{MODEL}/infer",
            {
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 30], "data": [0.0] * 30}
                ],
                "outputs": [{"name": "features"}],
            },
            400,
            "this model answers ['logits', 'probabilities']",
        ),
    ],
)
def test_bad_requests_are_refused_saying_what_was_wrong(
    table_site: Path, path: str, body: dict[str, object], status: int, says: str
) -> None:
    with serving(table_site / "model.onnx", Limits(max_batch=8)) as client:
        answer = client.post(path, json=body)
    assert answer.status_code == status
    assert says in answer.json()["error"]


def test_malformed_and_oversized_bodies_are_refused(table_site: Path) -> None:
    with serving(table_site / "model.onnx", Limits(max_body_bytes=1000)) as client:
        malformed = client.post(
            f"/v2/models/{MODEL}/infer",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )
        oversized = client.post(f"/v2/models/{MODEL}/infer", content=b"[" * 5000)
        alive = client.get("/v2/health/live")
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]
    assert (
        oversized.status_code == 413 and "over the limit of 1000 bytes" in oversized.json()["error"]
    )
    assert alive.status_code == 200


def test_tritonclient_calls_the_service_in_binary_and_in_json(
    table_site: Path, image_site: tuple[Path, Path]
) -> None:
    """NVIDIA's own HTTP client: health, metadata, FP32 in binary and JSON, BYTES records and
    DICOM files in binary, its errors."""
    import tritonclient.http as triton  # noqa: PLC0415
    from tritonclient.utils import InferenceServerException  # noqa: PLC0415

    predictor = Predictor(table_site / "model.onnx")
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(2)).numpy()
    with serving(table_site / "model.onnx") as client:
        client_url = str(client.base_url).removeprefix("http://")
        with triton.InferenceServerClient(client_url) as server:
            assert server.is_server_live() and server.is_server_ready()
            assert server.is_model_ready(MODEL)
            meta = server.get_model_metadata(MODEL)
            assert meta["inputs"][0]["shape"] == [-1, 30]
            for binary in (True, False):
                tensor = triton.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x, binary_data=binary)
                outputs = [triton.InferRequestedOutput("logits", binary_data=binary)]
                result = server.infer(MODEL, [tensor], outputs=outputs)
                np.testing.assert_allclose(
                    result.as_numpy("logits"), predictor.logits(torch.from_numpy(x)), rtol=1e-6
                )
            features = predictor.describe()["features"]
            record = json.dumps(dict.fromkeys(features, 0.5)).encode()
            raw = triton.InferInput("record", [1], "BYTES")
            raw.set_data_from_numpy(np.array([record], dtype=np.object_))
            result = server.infer(MODEL, [raw])  # no outputs named: all of them, in binary
            assert result.as_numpy("probabilities").shape == (1, 2)
            with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
                server.infer("nope", [tensor])
            wrong = triton.InferInput("input", [1, 29], "FP32")
            wrong.set_data_from_numpy(np.zeros((1, 29), dtype=np.float32))
            with pytest.raises(InferenceServerException, match=r"shape \[1, 29\]"):
                server.infer(MODEL, [wrong])

    state, folder = image_site
    files = sorted(folder.glob("*.dcm"))[:2]
    with serving(state / "model.onnx") as client:
        own = [
            client.post(
                "/predict", content=f.read_bytes(), headers={"Content-Type": "application/dicom"}
            ).json()
            for f in files
        ]
        with triton.InferenceServerClient(str(client.base_url).removeprefix("http://")) as server:
            dicom = triton.InferInput("dicom", [2], "BYTES")
            dicom.set_data_from_numpy(np.array([f.read_bytes() for f in files], dtype=np.object_))
            result = server.infer(
                MODEL, [dicom], outputs=[triton.InferRequestedOutput("probabilities")]
            )
    for row, answer in zip(result.as_numpy("probabilities"), own, strict=True):
        assert row.tolist() == pytest.approx(list(answer["probabilities"].values()))
