"""KServe's own code, run by the kserve venv's Python (``.venv/kserve/bin/python``): its
``InferenceRESTClient`` calling a server, and its models loading an InferenceService manifest.

It imports nothing from medsplit (that venv holds only kserve, onnxruntime and numpy) and
answers on stdout in JSON, so tests compare what KServe saw with onnxruntime's own output.
Own process, own venv: kserve pins psutil<6 where the main venv needs psutil>=7, and its
protobufs and tritonclient's share the ``inference`` package, which one process cannot load
twice.

    python kserve_side.py client REQUEST.json     # -> {"live": ..., "logits": ..., ...}
    python kserve_side.py manifest SERVICE.yaml   # -> {"round_trip": ..., "name": ...}
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import sys
from pathlib import Path
from typing import Any

import httpx
import kubernetes.client
import numpy as np
import yaml
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve import models as kserve_models
from kserve.api_client import ApiClient


async def _refusal(client: InferenceRESTClient, url: str, request: Any, model: str) -> str:
    try:
        await client.infer(url, request, model_name=model)
    except httpx.HTTPStatusError as exc:
        return f"{exc.response.status_code} {exc}"
    return "accepted"


async def client(spec: dict[str, Any]) -> dict[str, Any]:
    """Health, an FP32 batch in binary and in JSON, a BYTES record, and two refusals."""
    verify: Any = True
    if "ca" in spec:
        verify = ssl.create_default_context(cafile=spec["ca"])
        if "cert" in spec:
            verify.load_cert_chain(spec["cert"], spec["key"])
    config = RESTConfig(protocol="v2", verify=verify, timeout=60)
    url, model = spec["url"], spec["model"]
    x = np.asarray(spec["input"], dtype=np.float32)
    answer: dict[str, Any] = {}
    async with InferenceRESTClient(config) as rest:
        answer["live"] = await rest.is_server_live(url)
        answer["ready"] = await rest.is_server_ready(url)
        answer["model_ready"] = await rest.is_model_ready(url, model)
        for binary in (True, False):
            tensor = InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            result = await rest.infer(url, InferRequest(model, [tensor]), model_name=model)
            outputs = {output.name: output.as_numpy().tolist() for output in result.outputs}
            answer["binary" if binary else "json"] = outputs
        record = InferInput("record", [1], "BYTES")
        record.set_data_from_numpy(np.array([spec["record"].encode()], dtype=np.object_))
        result = await rest.infer(url, InferRequest(model, [record]), model_name=model)
        answer["record"] = {o.name: o.as_numpy().tolist() for o in result.outputs}
        wrong = InferInput("input", [1, x.shape[1] - 1], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, x.shape[1] - 1), dtype=np.float32))
        answer["wrong_shape"] = await _refusal(rest, url, InferRequest(model, [wrong]), model)
        answer["unknown_model"] = await _refusal(rest, url, InferRequest("nope", [wrong]), "nope")
    return answer


def _build(value: Any, kind: str, where: str) -> Any:
    """``value`` as the generated model class ``kind`` (KServe's, or Kubernetes' that KServe's
    refer to), refusing a field the class does not declare: the models' own schema, strictly.
    The two generators spell containers differently (``dict(str, X)``, ``Dict[str, X]``)."""
    container = re.fullmatch(r"(?:list\[|List\[)(.*)\]", kind)
    if container:
        assert isinstance(value, list), f"{where}: expected a list"
        return [_build(item, container[1], f"{where}[{i}]") for i, item in enumerate(value)]
    container = re.fullmatch(r"(?:dict\(str, |Dict\[str, )(.*)[)\]]", kind)
    if container:
        assert isinstance(value, dict), f"{where}: expected a mapping"
        return {key: _build(item, container[1], f"{where}.{key}") for key, item in value.items()}
    primitive = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if kind in primitive:
        assert isinstance(value, primitive[kind]), f"{where}: expected {kind}, got {value!r}"
        return value
    model = getattr(kserve_models, kind, None) or getattr(kubernetes.client.models, kind)
    assert isinstance(value, dict), f"{where}: expected a {kind} mapping"
    fields = {json_key: attr for attr, json_key in model.attribute_map.items()}
    unknown = sorted(set(value) - set(fields))
    assert not unknown, f"{where}: {kind} has no field {unknown}"
    return model(
        **{
            fields[key]: _build(item, model.openapi_types[fields[key]], f"{where}.{key}")
            for key, item in value.items()
        }
    )


def _within(written: Any, read: Any) -> bool:
    """Every field written comes back with its value (KServe adds its defaults, such as the
    model's empty container name)."""
    if isinstance(written, dict):
        return isinstance(read, dict) and all(
            key in read and _within(value, read[key]) for key, value in written.items()
        )
    return bool(written == read)


def manifest(path: Path) -> dict[str, Any]:
    """The manifest built as KServe's ``V1beta1InferenceService`` (a field its models do not
    declare, or a value of the wrong type, fails) and written back by KServe's serializer."""
    document = yaml.safe_load(path.read_text())
    service = _build(document, "V1beta1InferenceService", path.name)
    model = service.spec.predictor.model
    return {
        "round_trip": _within(document, ApiClient().sanitize_for_serialization(service)),
        "kind": service.kind,
        "name": service.metadata.name,
        "format": model.model_format.name,
        "protocol": model.protocol_version,
        "runtime": model.runtime,
        "storage_uri": model.storage_uri,
    }


def main(argv: list[str]) -> int:
    command, path = argv[1], Path(argv[2])
    if command == "client":
        result = asyncio.run(client(json.loads(path.read_text())))
    elif command == "manifest":
        result = manifest(path)
    else:
        print(f"unknown command {command!r}; expected client or manifest", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
