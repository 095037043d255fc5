"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on grpcio, beside
the REST endpoints of ``medsplit serve`` and answering exactly as they do.

The service and its messages are the protocol's protobufs as NVIDIA ships them in
``tritonclient`` (a superset of KServe's ``grpc_predict_v2.proto``, same package and service
name), so Triton's and KServe's gRPC clients both call it. Requests are translated into the
REST form and answered by the same ``ServedModel``: one set of checks and one set of messages
for both transports. Inputs arrive as ``raw_input_contents`` (what tritonclient sends) or as
typed ``contents``; outputs always go back as ``raw_output_contents``, little-endian FP32,
as Triton answers them.

Besides the protocol's six calls (ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata, ModelInfer) it answers Triton's ModelConfig with the configuration
``medsplit export --format triton`` writes, whose ``parameters`` carry the model card (the
gRPC ModelMetadataResponse has no parameters of its own). Refusals are gRPC status codes with
the REST message: NOT_FOUND for an unknown model, INVALID_ARGUMENT for a bad tensor,
RESOURCE_EXHAUSTED for too many rows or too many bytes.
"""

from __future__ import annotations

import logging
import os
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from edge_agent.serving.bodies import HttpError
from edge_agent.serving.oip import ServedModel, server_metadata
from edge_agent.serving.platforms import triton_config

log = logging.getLogger(__name__)

_CODES = {
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@dataclass(frozen=True)
class GrpcOptions:
    """Where and how the gRPC service listens: TLS as ``medsplit serve``'s HTTPS."""

    host: str = "127.0.0.1"
    port: int = 8081
    max_message_bytes: int = 64 * 1024 * 1024
    # Handlers at once: one per core. On 2 cores, 2 beat 1, 4 and 8 in throughput and p99
    # (bench/inference.py): more threads only contend for the GIL and onnxruntime's pool.
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # clients must show a certificate signed by it


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The protocol's calls for one served model."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=True)  # the model loaded before the port opened

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(**server_metadata())

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=True)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request.name, request.version, context)
        meta = self.model.metadata()
        response = pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"]
        )
        for kind in ("inputs", "outputs"):
            for tensor in meta[kind]:
                getattr(response, kind).add(**tensor)
        return response

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request.name, request.version, context)
        return pb.ModelConfigResponse(config=triton_config(self.model))

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request.model_name, request.model_version, context)
        try:
            document, binary = as_rest(request)
            answer, data = self.model.infer(document, binary)
        except HttpError as exc:
            _refuse(context, exc)
        except Exception:  # a bug, not the client's fault: say so, keep serving
            log.exception("ModelInfer failed")
            _abort(context, grpc.StatusCode.INTERNAL, "internal error; see the service log")
        response = pb.ModelInferResponse(
            model_name=answer["model_name"], model_version=answer["model_version"]
        )
        if request.id:
            response.id = request.id
        for output in answer["outputs"]:
            response.outputs.add(
                name=output["name"], datatype=output["datatype"], shape=output["shape"]
            )
        response.raw_output_contents.extend(data)
        return response

    def _check(self, name: str, version: str, context: grpc.ServicerContext) -> None:
        try:
            self.model.check(name, version or None)
        except HttpError as exc:
            _refuse(context, exc)


def as_rest(request: Any) -> tuple[dict[str, Any], bytes]:
    """A ModelInferRequest in the REST form ``ServedModel.infer`` reads: the JSON document and
    the binary data its inputs point into; every output is asked for in binary."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise HttpError(
            400,
            f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input or none",
        )
    inputs: list[dict[str, Any]] = []
    for index, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if raw:
            entry["parameters"] = {"binary_data_size": len(raw[index])}
        else:
            entry["data"] = _contents(tensor)
        inputs.append(entry)
    document: dict[str, Any] = {"inputs": inputs, "parameters": {"binary_data_output": True}}
    if request.outputs:
        document["outputs"] = [{"name": output.name} for output in request.outputs]
    return document, b"".join(raw)


def _contents(tensor: Any) -> Any:
    """A tensor's typed contents, as the datatype it declares says to read them."""
    if tensor.datatype == "FP32":
        return np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
    if tensor.datatype == "BYTES":
        return list(tensor.contents.bytes_contents)
    return None  # the model refuses the datatype with its own message


def _refuse(context: grpc.ServicerContext, exc: HttpError) -> NoReturn:
    """Answer the REST refusal as the gRPC status that means the same."""
    _abort(context, _CODES.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), str(exc))


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: ServicerContext.abort raises")  # pragma: no cover


def build_grpc_server(model: ServedModel, options: GrpcOptions) -> tuple[grpc.Server, int]:
    """A gRPC server for ``model`` bound to its port (not yet started), and the port it got
    (``port=0`` asks for a free one)."""
    limit = options.max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="oip-grpc"),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),  # a second server on a taken port fails, as HTTP does
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(model), server)
    address = f"{options.host}:{options.port}"
    if options.tls_cert is not None and options.tls_key is not None:
        credentials = grpc.ssl_server_credentials(
            [(options.tls_key.read_bytes(), options.tls_cert.read_bytes())],
            root_certificates=(
                options.tls_client_ca.read_bytes() if options.tls_client_ca else None
            ),
            require_client_auth=options.tls_client_ca is not None,
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"gRPC: cannot listen on {address} (is the port taken?)")
    return server, port
