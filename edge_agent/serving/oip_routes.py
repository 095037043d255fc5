"""The Open Inference Protocol's REST endpoints (``edge_agent.serving.oip``) on ``medsplit
serve``'s ASGI app, beside its own ``/predict`` and ``/metadata``.

``GET /v2/health/live``, ``/v2/health/ready``, ``GET /v2``, ``GET /v2/models/{name}``,
``GET /v2/models/{name}/ready`` and ``POST /v2/models/{name}/infer``, each also under
``/v2/models/{name}/versions/{version}``. Errors answer ``{"error": ...}`` with the status the
protocol's ``ProtocolError`` carries; the body limit is the app's.
"""

from __future__ import annotations

import json
import os
from typing import Any

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from edge_agent.serving.bodies import HttpError, parse_json, read_body
from edge_agent.serving.oip import ProtocolError, ServedModel, server_metadata
from edge_agent.serving.oip_binary import HEADER, BinaryError, split_body

# Requests up to this size are parsed and inferred on the event loop, in arrival order, as
# KServe's ModelServer runs its models: for them a thread handoff costs more than the work and
# lengthens the tail under load. Larger ones (DICOM files, image batches) go to worker threads
# so the loop keeps answering health checks (bench/inference.py measured both).
INLINE_BYTES = 64 * 1024


def oip_router(model: ServedModel, max_body_bytes: int, workers: int | None = None) -> APIRouter:
    """``workers``: inferences at once, in worker threads; the others wait their turn in
    order, which keeps the tail short where 40 threads would contend (bench/inference.py)."""
    router = APIRouter(prefix="/v2")
    limiter = CapacityLimiter(workers or os.cpu_count() or 2)  # one per core

    def error(exc: HttpError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @router.get("/health/live")
    def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}  # the model loaded before the server started listening

    @router.get("")
    def metadata() -> dict[str, Any]:
        return server_metadata()

    def model_metadata(name: str, version: str | None = None) -> JSONResponse:
        try:
            model.check(name, version)
        except ProtocolError as exc:
            return error(exc)
        return JSONResponse(model.metadata())

    def model_ready(name: str, version: str | None = None) -> JSONResponse:
        try:
            model.check(name, version)
        except ProtocolError as exc:
            return error(exc)
        return JSONResponse({"name": name, "ready": True})

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        try:
            model.check(name, version)
            body = await read_body(request, max_body_bytes)
            header = request.headers.get(HEADER)
            if len(body) <= INLINE_BYTES:  # a row or a small image: less work than a handoff
                answer, data = _infer(model, body, header)
            else:
                answer, data = await anyio.to_thread.run_sync(
                    _infer, model, body, header, limiter=limiter
                )
        except HttpError as exc:
            return error(exc)
        if not data:
            return JSONResponse(answer)
        document = json.dumps(answer, separators=(",", ":")).encode()
        return Response(
            document + b"".join(data),
            media_type="application/octet-stream",
            headers={HEADER: str(len(document))},
        )

    for prefix in ("/models/{name}", "/models/{name}/versions/{version}"):
        router.add_api_route(prefix, model_metadata, methods=["GET"])
        router.add_api_route(f"{prefix}/ready", model_ready, methods=["GET"])
        router.add_api_route(f"{prefix}/infer", infer, methods=["POST"])
    return router


def _infer(
    model: ServedModel, body: bytes, header: str | None
) -> tuple[dict[str, Any], list[bytes]]:
    """Parse and answer in a worker thread: the event loop only moves bytes."""
    try:
        text, binary = split_body(body, header)
    except BinaryError as exc:
        raise ProtocolError(400, str(exc)) from None
    return model.infer(parse_json(text), binary)
