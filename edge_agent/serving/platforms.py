"""A site's model handed to the serving platforms hospitals already run: a Triton model
repository and a KServe ``InferenceService`` (``medsplit export --format triton|kserve``).

Triton's ``config.pbtxt`` is built as Triton's own ``ModelConfig`` protobuf (shipped in
``tritonclient``) and written in protobuf text format, so it parses exactly as Triton parses it;
``medsplit serve`` answers Triton's ModelConfig call with the same message. The model card
travels in the config's ``parameters``, as it does in the Open Inference Protocol's metadata.

The InferenceService asks KServe for its ONNX runtime (Triton, V2 protocol) and points at the
storage URI where the user puts the repository; the service's name is the model's, so the
protocol's URLs are the same as ``medsplit serve``'s: ``/v2/models/NAME/infer``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as triton

from edge_agent.serving.oip import PLATFORM, VERSION, ServedModel, card_parameters
from edge_agent.serving.predictor import Predictor
from edge_agent.site_model import export_site_model
from models.onnx_export import INPUT_NAME, OUTPUT_NAME

Platform = Literal["triton", "kserve"]

# A Kubernetes object name (DNS-1123 label), also a safe directory name for Triton.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
KSERVE_RUNTIME = "kserve-tritonserver"


class PlatformError(ValueError):
    """A name or a storage URI the platforms would refuse; the message says which."""


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise PlatformError(
            f"--name {name!r}: expected lower-case letters, digits and '-', starting and "
            "ending with a letter or digit, at most 63 characters (a Kubernetes name)"
        )
    return name


def check_storage_uri(uri: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*://\S+", uri):
        raise PlatformError(
            f"--storage-uri {uri!r}: expected a URI KServe can fetch, such as "
            "s3://bucket/medsplit, gs://bucket/medsplit or pvc://claim/medsplit"
        )
    return uri


def triton_config(model: ServedModel) -> Any:
    """Triton's configuration for the ONNX graph: its one input and output with a dynamic batch
    up to the served batch limit, dynamic batching, and the model card as parameters."""
    config = triton.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=model.max_batch,
        dynamic_batching=triton.ModelDynamicBatching(),
    )
    config.input.add(
        name=INPUT_NAME, data_type=triton.TYPE_FP32, dims=list(model.predictor.card.input_shape)
    )
    config.output.add(name=OUTPUT_NAME, data_type=triton.TYPE_FP32, dims=[model.class_count])
    for key, value in card_parameters(model.predictor).items():
        config.parameters[key].string_value = value
    return config


def write_triton_repository(model: ServedModel, out: Path) -> Path:
    """``out/NAME/config.pbtxt`` and ``out/NAME/1/model.onnx``; returns the model's folder."""
    folder = out / model.name
    (folder / VERSION).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model.predictor.path, folder / VERSION / "model.onnx")
    (folder / "config.pbtxt").write_text(text_format.MessageToString(triton_config(model)))
    return folder


def kserve_manifest(model: ServedModel, storage_uri: str) -> dict[str, Any]:
    """An ``InferenceService`` for KServe's ONNX runtime serving the Triton repository that
    lies at ``storage_uri``."""
    check_storage_uri(storage_uri)
    card = model.predictor.card
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": model.name,
            "labels": {"app.kubernetes.io/part-of": "medsplit"},
            "annotations": {
                "medsplit.io/job-id": card.job_id,
                "medsplit.io/site-id": card.site_id,
                "medsplit.io/weights-sha256": card.weights_sha256 or "",
            },
        },
        "spec": {
            "predictor": {
                "model": {
                    "modelFormat": {"name": "onnx"},
                    "protocolVersion": "v2",
                    "runtime": KSERVE_RUNTIME,
                    "storageUri": storage_uri,
                    "resources": {
                        "requests": {"cpu": "500m", "memory": "1Gi"},
                        "limits": {"cpu": "2", "memory": "4Gi"},
                    },
                }
            }
        },
    }


def write_kserve(model: ServedModel, out: Path, storage_uri: str) -> Path:
    """The Triton repository under ``out`` (what to copy to ``storage_uri``) and
    ``out/inferenceservice.yaml``; returns the manifest's path."""
    manifest = kserve_manifest(model, storage_uri)
    write_triton_repository(model, out)
    path = out / "inferenceservice.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def export_for_platform(
    source: Path,
    out: Path,
    platform: Platform,
    *,
    site: str | None = None,
    name: str | None = None,
    storage_uri: str | None = None,
    max_batch: int = 64,
) -> list[Path]:
    """Export a site's model (checked against torch, as ``medsplit export`` does) into what
    ``platform`` loads, under ``out``; returns the files written.

    The name defaults to the site's id. Names and the storage URI are checked before the
    export runs, so a typo costs no export.
    """
    if name is not None:
        check_name(name)
    if platform == "kserve":
        if storage_uri is None:
            raise PlatformError(
                "--format kserve needs --storage-uri, where the repository will lie"
            )
        check_storage_uri(storage_uri)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as scratch:
        onnx_path = Path(scratch) / "model.onnx"
        export_site_model(source, onnx_path, site=site)
        predictor = Predictor(onnx_path)
        model = ServedModel(check_name(name or predictor.card.site_id), predictor, max_batch)
        if platform == "kserve":
            assert storage_uri is not None
            manifest = write_kserve(model, out, storage_uri)
            folder = out / model.name
            return [folder / "config.pbtxt", folder / VERSION / "model.onnx", manifest]
        folder = write_triton_repository(model, out)
        return [folder / "config.pbtxt", folder / VERSION / "model.onnx"]
