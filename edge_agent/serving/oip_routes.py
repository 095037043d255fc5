"""The Open Inference Protocol's REST endpoints (``edge_agent.serving.oip``) on ``medsplit
serve``'s ASGI app, beside its own ``/predict`` and ``/metadata``.

``GET /v2/health/live``, ``/v2/health/ready``, ``GET /v2``, ``GET /v2/models/{name}``,
``GET /v2/models/{name}/ready`` and ``POST /v2/models/{name}/infer``, each also under
``/v2/models/{name}/versions/{version}``. Errors answer ``{"error": ...}`` with the status the
protocol's ``ProtocolError`` carries; the body limit is the app's.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from edge_agent.serving.bodies import HttpError, parse_json, read_body
from edge_agent.serving.oip import ProtocolError, ServedModel, server_metadata
from edge_agent.serving.oip_binary import HEADER, BinaryError, split_body


def oip_router(model: ServedModel, max_body_bytes: int) -> APIRouter:
    router = APIRouter(prefix="/v2")

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
            answer, data = await run_in_threadpool(_infer, model, body, header)
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
