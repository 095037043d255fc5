"""The Open Inference Protocol (KServe V2) for a site's model: what the requests mean, apart
from the transport that carries them (REST in ``edge_agent.serving.oip_routes``).

The model answers as ``NAME`` (the ONNX file's stem unless ``medsplit serve --name`` says
otherwise), version ``1``. It takes exactly one of three inputs per request:

* ``input`` (FP32, ``[n, *input_shape]``): inputs already prepared as the site trained on them;
* ``dicom`` (BYTES, ``[n]``; image models): DICOM files, base64 in JSON, prepared with the
  model card exactly as ``/predict`` prepares an upload;
* ``record`` (BYTES, ``[n]``; table models): JSON objects of column: value, as ``/predict``'s
  ``{"record": ...}``.

It answers ``logits`` and ``probabilities`` (FP32, ``[n, classes]``), or those the request
names. Anything else is a ``ProtocolError``: the status and a message that says what was wrong
and what was expected (unknown model or input, wrong datatype or shape, too many rows).
Model metadata carries the model card in ``parameters``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_agent.data.inputs import FileInput, InputError
from edge_agent.serving.bodies import HttpError
from edge_agent.serving.oip_binary import BinaryError, Blobs, bytes_elements
from edge_agent.serving.predictor import Predictor, probabilities
from medsplit import __version__

VERSION = "1"
PLATFORM = "onnxruntime_onnx"
OUTPUTS = ("logits", "probabilities")


class ProtocolError(HttpError):
    """A request the protocol refuses, with the HTTP status it answers."""


@dataclass(frozen=True)
class ServedModel:
    """A predictor under the name and version clients ask for."""

    name: str
    predictor: Predictor
    max_batch: int = 64

    def check(self, name: str, version: str | None) -> None:
        if name != self.name:
            raise ProtocolError(404, f"unknown model {name!r}; this server serves {self.name!r}")
        if version not in (None, VERSION):
            raise ProtocolError(
                404, f"model {name!r} has no version {version!r}; it has version {VERSION!r}"
            )

    @property
    def raw_input(self) -> str:
        """The BYTES input of this model's raw records: DICOM, PNG/JPEG (``picture``) or NIfTI
        (``volume``) files, or table records."""
        encoding = self.predictor.card.data.input
        return encoding.kind if isinstance(encoding, FileInput) else "record"

    @property
    def class_count(self) -> int:
        return len(self.predictor.classes)

    def metadata(self) -> dict[str, Any]:
        shape, classes = list(self.predictor.card.input_shape), self.class_count
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": PLATFORM,
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [-1, *shape]},
                {"name": self.raw_input, "datatype": "BYTES", "shape": [-1]},
            ],
            "outputs": [
                {"name": output, "datatype": "FP32", "shape": [-1, classes]} for output in OUTPUTS
            ],
            "parameters": card_parameters(self.predictor),
        }

    def infer(self, request: Any, binary: bytes = b"") -> tuple[dict[str, Any], list[bytes]]:
        """Answer an inference request (the parsed JSON, and the binary data after it): the
        answer's JSON, and the binary data of the outputs asked for in binary."""
        if not isinstance(request, Mapping):
            raise ProtocolError(400, "the body must be a JSON object with 'inputs'")
        inputs = request.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], Mapping):
            raise ProtocolError(
                400,
                "inputs: expected exactly one input tensor, 'input' (FP32) or "
                f"'{self.raw_input}' (BYTES)",
            )
        blobs = Blobs(binary)
        try:
            batch = self._prepare(inputs[0], blobs)
            blobs.check_used()
        except BinaryError as exc:
            raise ProtocolError(400, str(exc)) from None
        wanted = _requested(request.get("outputs"), request.get("parameters"))
        logits = self.predictor.logits(batch)
        outputs, data = [], []
        for name, in_binary in wanted:
            multilabel = self.predictor.card.data.multilabel
            result = logits if name == "logits" else probabilities(logits, multilabel)
            values = np.ascontiguousarray(result, dtype="<f4")
            output: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(values.shape)}
            if in_binary:
                data.append(values.tobytes())
                output["parameters"] = {"binary_data_size": values.nbytes}
            else:
                output["data"] = values.reshape(-1).tolist()
            outputs.append(output)
        answer: dict[str, Any] = {
            "model_name": self.name,
            "model_version": VERSION,
            "outputs": outputs,
        }
        if "id" in request:
            answer["id"] = str(request["id"])
        return answer, data

    # -- inputs ------------------------------------------------------------------------------------

    def _prepare(self, tensor: Mapping[str, Any], blobs: Blobs) -> torch.Tensor:
        name = tensor.get("name")
        shape, datatype, data = tensor.get("shape"), tensor.get("datatype"), tensor.get("data")
        binary = blobs.take(tensor)
        if name == "input":
            values = np.frombuffer(binary, dtype="<f4") if binary is not None else None
            if binary is not None and len(binary) % 4:
                raise ProtocolError(400, f"input: {len(binary)} bytes are not FP32 values")
            return self._fp32(shape, datatype, data if values is None else values)
        if name == self.raw_input:
            elements = bytes_elements(binary, name) if binary is not None else data
            return self._raw(shape, datatype, elements)
        raise ProtocolError(
            400,
            f"unknown input {name!r}; this model takes 'input' (FP32) or '{self.raw_input}' "
            "(BYTES)",
        )

    def _rows(self, shape: Any) -> int:
        if not isinstance(shape, list) or not shape or not all(isinstance(d, int) for d in shape):
            raise ProtocolError(400, f"shape: expected a list of integers, got {shape!r}")
        if shape[0] < 1:
            raise ProtocolError(400, f"shape: the batch dimension must be at least 1, got {shape}")
        if shape[0] > self.max_batch:
            raise ProtocolError(413, f"{shape[0]} rows; the limit is {self.max_batch} per request")
        return int(shape[0])

    def _fp32(self, shape: Any, datatype: Any, data: Any) -> torch.Tensor:
        expected = [-1, *self.predictor.card.input_shape]
        if datatype != "FP32":
            raise ProtocolError(400, f"input: datatype {datatype!r}; expected 'FP32'")
        rows = self._rows(shape)
        if list(shape[1:]) != expected[1:]:
            raise ProtocolError(400, f"input: shape {shape}; expected {expected}")
        if isinstance(data, np.ndarray):
            flat: np.ndarray | None = data.astype(np.float32)
        else:
            flat = np.asarray(_flatten(data), dtype=np.float32) if data is not None else None
        if flat is None or flat.size != math.prod(shape):
            got = "no data" if flat is None else f"{flat.size} values"
            raise ProtocolError(400, f"input: {got} for shape {shape} ({math.prod(shape)})")
        if not np.isfinite(flat).all():
            raise ProtocolError(400, "input: values must be finite numbers")
        return torch.from_numpy(flat.reshape(rows, *expected[1:]))

    def _raw(self, shape: Any, datatype: Any, data: Any) -> torch.Tensor:
        name = self.raw_input
        if datatype != "BYTES":
            raise ProtocolError(400, f"{name}: datatype {datatype!r}; expected 'BYTES'")
        rows = self._rows(shape)
        if list(shape) != [rows] or not isinstance(data, list) or len(data) != rows:
            raise ProtocolError(400, f"{name}: expected shape [n] and n elements, got {shape}")
        try:
            prepared = [self._one(name, element, f"{name}[{i}]") for i, element in enumerate(data)]
        except InputError as exc:
            raise ProtocolError(400, str(exc)) from None
        return torch.stack(prepared)

    def _one(self, name: str, element: Any, where: str) -> torch.Tensor:
        if isinstance(element, bytes):  # binary data: the file or the record as it is
            if name != "record":
                return self.predictor.from_file(element, where)
            element = element.decode("utf-8", errors="replace")
        if not isinstance(element, str):
            raise ProtocolError(400, f"{where}: expected a string element")
        if name != "record":
            try:
                return self.predictor.from_file(base64.b64decode(element, validate=True), where)
            except binascii.Error:
                raise ProtocolError(
                    400, f"{where}: not base64 (send the file's bytes as base64 in JSON)"
                ) from None
        try:
            record = json.loads(element)
        except json.JSONDecodeError as exc:
            raise ProtocolError(400, f"{where}: not a JSON object ({exc})") from None
        return self.predictor.from_json({"record": record}, where)


def card_parameters(predictor: Predictor) -> dict[str, str]:
    """The model card as the protocol's string parameters: what a client needs to prepare
    inputs and read answers (classes, preprocessing) and where the model came from."""
    card, described = predictor.card, predictor.describe()
    return {
        "classes": json.dumps(predictor.classes),
        "job_id": card.job_id,
        "site_id": card.site_id,
        "weights_sha256": card.weights_sha256 or "",
        "preprocessing": json.dumps(described["preprocessing"]),
        "model_card": json.dumps(described, default=str),
    }


def server_metadata() -> dict[str, Any]:
    return {"name": "medsplit", "version": __version__, "extensions": ["binary_tensor_data"]}


def _requested(outputs: Any, parameters: Any) -> list[tuple[str, bool]]:
    """The outputs a request names (all of them when it names none), each with whether it
    goes back as binary data."""
    every = isinstance(parameters, Mapping) and parameters.get("binary_data_output") is True
    if outputs is None:
        return [(name, every) for name in OUTPUTS]
    wanted: list[tuple[str, bool]] = []
    for output in outputs if isinstance(outputs, list) else [None]:
        name = output.get("name") if isinstance(output, Mapping) else None
        if name not in OUTPUTS:
            raise ProtocolError(400, f"outputs: {outputs!r}; this model answers {list(OUTPUTS)}")
        assert isinstance(output, Mapping)
        options = output.get("parameters")
        binary = isinstance(options, Mapping) and options.get("binary_data") is True
        wanted.append((str(name), binary or every))
    return wanted or [(name, every) for name in OUTPUTS]


def _flatten(data: Any) -> list[Any]:
    """OIP allows the data row-major flat or nested like the shape."""
    if not isinstance(data, list):
        raise ProtocolError(400, "data: expected a list of numbers")
    flat: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, bool) or not isinstance(item, int | float):
            raise ProtocolError(400, f"data: {item!r} is not a number")
        else:
            flat.append(item)
    return flat
