"""Request bodies under a limit, and the error every endpoint answers with a status.

Both the service's own endpoints (``edge_agent.serving.app``) and the Open Inference Protocol's
(``oip_routes``) read bodies this way: the limit holds as the body streams in, with or without
a Content-Length (a chunked upload is cut off at the limit).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request


class HttpError(Exception):
    """An answer other than 200, with the message the client gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def limited(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The body's chunks, cut off with a 413 once they pass ``limit``."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"request body over the limit of {limit} bytes")
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, within the limit; an empty one is a 400."""
    body = b"".join([chunk async for chunk in limited(request, limit)])
    if not body:
        raise HttpError(400, "empty request body")
    return body


def parse_json(body: bytes) -> Any:
    """The body as JSON; anything else (nesting too deep for the parser included) is a 400."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"body is not valid JSON ({exc})") from None
    except RecursionError:
        raise HttpError(400, "body is not valid JSON (nested too deeply)") from None
