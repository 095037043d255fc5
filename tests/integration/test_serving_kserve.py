"""The model handed to the platforms hospitals run, checked by those platforms' own code:
KServe's ``InferenceRESTClient`` calls a real ``medsplit serve``; ``medsplit export --format
triton`` writes a repository whose ``config.pbtxt`` parses with Triton's protobufs and whose
model answers as the served one; ``--format kserve`` writes an InferenceService that KServe's
models load unchanged. KServe runs in its own venv (tests/support/kserve_side.py says why)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from edge_agent.serving.predictor import Predictor
from tests.integration.test_serving_http import table_site
from tests.support.serve_process import KSERVE_PYTHON, KSERVE_SIDE, serve_process

pytestmark = pytest.mark.integration
__all__ = ["table_site"]


def _kserve(command: str, path: Path) -> Any:
    assert KSERVE_PYTHON.exists(), f"{KSERVE_PYTHON} is missing: run scripts/setup.sh"
    done = subprocess.run(
        [str(KSERVE_PYTHON), str(KSERVE_SIDE), command, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _export(state: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medsplit", "export", "--run", str(state), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_kserves_rest_client_calls_a_serve_process(table_site: Path, tmp_path: Path) -> None:
    predictor = Predictor(table_site / "model.onnx")
    x = torch.randn(3, 30, generator=torch.Generator().manual_seed(5))
    record = dict.fromkeys(predictor.describe()["features"], 0.25)
    with serve_process(table_site / "model.onnx") as up:
        request = {
            "url": up.url,
            "model": "model",
            "input": x.tolist(),
            "record": json.dumps(record),
        }
        (tmp_path / "request.json").write_text(json.dumps(request))
        seen = _kserve("client", tmp_path / "request.json")
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    for form in ("binary", "json"):
        np.testing.assert_allclose(seen[form]["logits"], predictor.logits(x), rtol=1e-6)
        np.testing.assert_allclose(
            seen[form]["probabilities"], predictor.probabilities(x), rtol=1e-5
        )
    own = predictor.probabilities(predictor.from_json({"record": record})[None])
    np.testing.assert_allclose(seen["record"]["probabilities"], own, rtol=1e-5)
    assert seen["wrong_shape"].startswith("400") and "shape [1, 29]" in seen["wrong_shape"]
    assert (
        seen["unknown_model"].startswith("404") and "unknown model 'nope'" in seen["unknown_model"]
    )


def test_a_triton_repository_parses_with_tritons_protobufs(
    table_site: Path, tmp_path: Path
) -> None:
    done = _export(table_site, tmp_path / "repo", "--format", "triton", "--max-batch", "16")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "repo" / "site-1"
    config = text_format.Parse(
        (folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.name == "site-1" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16 and config.HasField("dynamic_batching")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("input", model_config_pb2.TYPE_FP32, [30])
    ]
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", [2])]
    exported, served = Predictor(folder / "1" / "model.onnx"), Predictor(table_site / "model.onnx")
    assert json.loads(config.parameters["classes"].string_value) == exported.classes
    assert config.parameters["weights_sha256"].string_value == exported.card.weights_sha256
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(6))
    np.testing.assert_allclose(exported.logits(x), served.logits(x), rtol=1e-5, atol=1e-6)
    assert not list((tmp_path / "repo").glob(".export-*"))  # the scratch export is gone


def test_a_kserve_inference_service_loads_in_kserves_models(
    table_site: Path, tmp_path: Path
) -> None:
    uri = "s3://hospital-models/medsplit"
    done = _export(
        table_site,
        tmp_path / "out",
        "--format",
        "kserve",
        "--name",
        "breast-mlp",
        "--storage-uri",
        uri,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "breast-mlp" / "config.pbtxt").is_file()
    loaded = _kserve("manifest", tmp_path / "out" / "inferenceservice.yaml")
    assert loaded == {
        "round_trip": True,
        "kind": "InferenceService",
        "name": "breast-mlp",
        "format": "onnx",
        "protocol": "v2",
        "runtime": "kserve-tritonserver",
        "storage_uri": uri,
    }


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--format", "kserve"], "--format kserve needs --storage-uri"),
        (["--format", "triton", "--name", "Site_1"], "--name 'Site_1': expected lower-case"),
        (["--format", "kserve", "--storage-uri", "bucket/models"], "--storage-uri 'bucket/models'"),
    ],
)
def test_bad_export_options_are_refused_in_one_line(
    table_site: Path, tmp_path: Path, args: list[str], says: str
) -> None:
    done = _export(table_site, tmp_path / "out", *args)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr
