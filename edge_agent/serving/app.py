"""``medsplit serve``: a site's exported model behind HTTP, on uvicorn (an ASGI server).

Endpoints:

* ``POST /predict`` -- one input: a DICOM file (``Content-Type: application/dicom``, or one
  file in ``multipart/form-data``), or JSON ``{"features": [...]}`` / ``{"record": {...}}`` /
  ``{"image": [[...]]}``. Answers ``{"class", "probabilities", "model"}``.
* ``POST /predict/batch`` -- several: DICOM files in one ``multipart/form-data`` request, or JSON
  ``{"instances": [...]}``. Answers ``{"predictions": [...], "model"}``, in request order.
* ``GET /healthz``, ``GET /metadata`` (the model card, input encoding, runtime),
  ``GET /metrics`` (Prometheus).
* ``/v2/...``: the Open Inference Protocol (KServe V2) over REST (``oip_routes``).

Bad input never reaches the model: a body that is not DICOM or not JSON, the wrong number of
features, an unknown category, an image of the wrong size, too many instances -- each is a 4xx
answer ``{"error": ...}`` that says what was wrong and what was expected. The body limit holds
for every form, with or without a Content-Length (a chunked upload is cut off at the limit,
413); JSON is parsed, and inference runs, in a worker thread, so the event loop keeps answering
health checks; JSON nested too deeply for the parser is a 400 like any other bad JSON.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser

from edge_agent.data.inputs import InputError
from edge_agent.serving.bodies import HttpError, limited, parse_json, read_body
from edge_agent.serving.oip import ServedModel
from edge_agent.serving.oip_routes import oip_router
from edge_agent.serving.predictor import Prediction, Predictor
from medsplit import __version__

log = logging.getLogger(__name__)
# One image file in the body: DICOM, or PNG/JPEG for a model trained on pictures (the model's
# card decides how the bytes are read; the type only says it is a file, not JSON).
FILE_TYPES = ("application/dicom", "application/octet-stream", "image/png", "image/jpeg")


def _phrase(status: int) -> str:
    """The reason of an error answer that is about the request itself: the HTTP phrase."""
    return HTTPStatus(status).phrase.lower()


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_batch: int = 64


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "medsplit_inference_requests",
            "HTTP prediction requests by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.predictions = Counter(
            "medsplit_inference_predictions", "Inputs predicted", registry=self.registry
        )
        self.seconds = Histogram(
            "medsplit_inference_request_seconds",
            "Time to answer a prediction request (reading, preprocessing, inference)",
            ["endpoint"],
            registry=self.registry,
        )


def create_app(model: ServedModel, limits: Limits = Limits()) -> FastAPI:
    """The service of ``model``: its predictor behind ``/predict``, and the Open Inference
    Protocol under the model's name."""
    predictor = model.predictor
    app = FastAPI(
        title="medsplit inference",
        version=__version__,
        description=f"Site {predictor.card.site_id} of job {predictor.card.job_id}",
    )
    metrics = _Metrics()
    provenance = {
        "job_id": predictor.card.job_id,
        "site_id": predictor.card.site_id,
        "weights_sha256": predictor.card.weights_sha256,
    }

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # 404 and 405 answer the same {"error", "reason"} shape as every other error.
        body = {
            "error": f"{request.method} {request.url.path}: {exc.detail}",
            "reason": _phrase(exc.status_code),
        }
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        return predictor.describe()

    async def answer(endpoint: str, work: Callable[[], Awaitable[dict[str, Any]]]) -> JSONResponse:
        started = time.perf_counter()
        try:
            body, status = await work(), 200
        except HttpError as exc:
            body, status = {"error": str(exc), "reason": _phrase(exc.status)}, exc.status
        except InputError as exc:
            body, status = {"error": str(exc), "reason": exc.reason}, 422
        except Exception:  # a bug, not the client's fault: say so, keep serving
            log.exception("%s failed", endpoint)
            body = {"error": "internal error; see the service log", "reason": _phrase(500)}
            status = 500
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.seconds.labels(endpoint).observe(time.perf_counter() - started)
        return JSONResponse(body, status_code=status)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        async def work() -> dict[str, Any]:
            items = await _read_items(request, limits, batch=False)
            (prediction,) = await _predict(predictor, items, metrics)
            return {**prediction.as_json(), "model": provenance}

        return await answer("predict", work)

    @app.post("/predict/batch")
    async def predict_batch(request: Request) -> JSONResponse:
        async def work() -> dict[str, Any]:
            items = await _read_items(request, limits, batch=True)
            predictions = await _predict(predictor, items, metrics)
            return {"predictions": [p.as_json() for p in predictions], "model": provenance}

        return await answer("predict_batch", work)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(oip_router(model, limits.max_body_bytes))
    return app


@dataclass(frozen=True)
class _Item:
    """One input as it arrived: a file's bytes (``name`` for errors) or a JSON instance."""

    name: str
    file: bytes | None = None
    document: Any = None


async def _predict(predictor: Predictor, items: list[_Item], metrics: _Metrics) -> list[Prediction]:
    """Decode and infer in one worker thread: the event loop only moves bytes."""

    def work() -> list[Prediction]:
        inputs = [
            predictor.from_file(item.file, item.name)
            if item.file is not None
            else predictor.from_json(item.document, item.name)
            for item in items
        ]
        return predictor.predict(inputs)

    predictions = await run_in_threadpool(work)
    metrics.predictions.inc(len(predictions))
    return predictions


async def _read_items(request: Request, limits: Limits, *, batch: bool) -> list[_Item]:
    """The request's inputs, whatever form they came in, not yet decoded."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
        raise HttpError(
            413, f"request body of {length} bytes; the limit is {limits.max_body_bytes}"
        )
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        body = await read_body(request, limits.max_body_bytes)
        documents = await run_in_threadpool(_json_items, body, batch, limits)
        names = [f"instances[{i}]" for i in range(len(documents))] if batch else ["body"]
        return [_Item(name, document=d) for name, d in zip(names, documents, strict=True)]
    if kind in FILE_TYPES:
        if batch:
            raise HttpError(415, "send several files as multipart/form-data")
        return [_Item("upload", file=await read_body(request, limits.max_body_bytes))]
    if kind == "multipart/form-data":
        return [_Item(name, file=data) for name, data in await _uploads(request, limits, batch)]
    raise HttpError(
        415,
        f"unsupported Content-Type {kind or '(none)'!r}; send application/dicom (or image/png, "
        "image/jpeg), multipart/form-data (files) or application/json",
    )


def _json_items(body: bytes, batch: bool, limits: Limits) -> list[Any]:
    document = parse_json(body)
    if not batch:
        return [document]
    if not isinstance(document, dict) or set(document) != {"instances"}:
        raise HttpError(422, 'body: expected {"instances": [...]}')
    items = document["instances"]
    if not isinstance(items, list) or not items:
        raise HttpError(422, "instances: expected a non-empty list")
    if len(items) > limits.max_batch:
        raise HttpError(413, f"instances: {len(items)} items; the limit is {limits.max_batch}")
    return items


async def _uploads(request: Request, limits: Limits, batch: bool) -> list[tuple[str, bytes]]:
    """Every uploaded file of a multipart request, with its name for error messages."""
    most = limits.max_batch if batch else 1
    parser = MultiPartParser(
        request.headers,
        limited(request, limits.max_body_bytes),
        max_files=most,
        max_fields=most,
        max_part_size=limits.max_body_bytes,
    )
    try:
        form = await parser.parse()
    except HttpError:
        raise
    except Exception as exc:  # starlette's multipart errors share no base class
        raise HttpError(400, f"unreadable multipart body ({exc})") from None
    uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    if not uploads:
        raise HttpError(422, "multipart body holds no file; upload DICOM files as file fields")
    if not batch and len(uploads) != 1:
        raise HttpError(422, f"/predict takes one file, got {len(uploads)}; use /predict/batch")
    return [
        (upload.filename or f"file {i}", await upload.read()) for i, upload in enumerate(uploads)
    ]
