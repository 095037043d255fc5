"""Liveness and readiness over HTTP: what a Kubernetes probe or a Docker ``HEALTHCHECK`` asks.

Both processes serve ``GET /healthz`` (the process answers: alive), ``GET /readyz`` (every
readiness check passes: 200, else 503 naming the checks that fail and why) and ``GET /metrics``
(prometheus_client's registry: the process collectors now, the job's own metrics as they are
added). Checks are plain
callables returning ``None`` when fine or a sentence saying what is wrong, so each process
states its own (the aggregator: broker connected, checkpoint directory writable, certificate
valid long enough; an agent: data loaded, broker connected) and this module stays ignorant of
both.

The server is Starlette on uvicorn (the ASGI stack ``medsplit serve`` already uses), in a
daemon thread: a probe must be answered while the process trains. Starlette and uvicorn load
only when a port is configured, so the kernel stays light.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medsplit.http_guard import Guard, peer_certificate_protocol, read_token, uvicorn_tls
from models.config_errors import ConfigError

log = logging.getLogger(__name__)

# Pages may load nothing from anywhere but this process: a closed hospital network has no CDN,
# and a status page that phones out would leak who runs a federation.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
Check = Callable[[], "str | None"]  # None: fine; otherwise what is wrong, in one sentence


class HttpSettings(BaseModel):
    """The process's health endpoints (``/healthz``, ``/readyz``, ``/metrics``) for probes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int | None = Field(
        None, ge=0, le=65535, description="serve /healthz, /readyz, /metrics here; none: off"
    )
    host: str = Field(
        "127.0.0.1", description="address to listen on (0.0.0.0 in a pod, for the kubelet)"
    )
    ready_cert_days: float = Field(
        1.0, ge=0, description="not ready when the process's certificate expires sooner than this"
    )
    tls_cert: Path | None = Field(None, description="serve HTTPS with this certificate (PEM)")
    tls_key: Path | None = Field(None, description="and this private key (PEM)")
    tls_client_ca: Path | None = Field(
        None,
        description="a client certificate signed by this CA opens the page, /status and "
        "/metrics (the probes stay open)",
    )
    token_file: Path | None = Field(
        None,
        description="a file (a mounted Secret) holding a bearer token that opens the page, "
        "/status and /metrics (the probes stay open)",
    )

    @model_validator(mode="after")
    def _tls_files_go_together(self) -> HttpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(
                "tls_client_ca needs tls_cert and tls_key (client certificates need TLS)"
            )
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"


class HealthServer:
    """``/healthz`` and ``/readyz`` for one process, served from a daemon thread."""

    def __init__(
        self,
        settings: HttpSettings,
        checks: Mapping[str, Check],
        process: str,
        *,
        collectors: Sequence[Any] = (),
        pages: Mapping[str, tuple[str, bytes]] | None = None,
    ) -> None:
        self.settings = settings
        self.pages = dict(pages or {})  # path -> (media type, body): a status page, say
        self.checks = dict(checks)
        self.process = process
        self.collectors = tuple(collectors)  # prometheus_client collectors of the process's own
        # ``/status``: a JSON model of what the process is doing, once it has one to show.
        self.status: Callable[[], Mapping[str, Any]] | None = None
        self.port: int | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def readiness(self) -> dict[str, str]:
        """Each check's verdict: "ok" or what is wrong. A check that raises is not ready."""
        verdicts = {}
        for name, check in self.checks.items():
            try:
                problem = check()
            except Exception as exc:  # a broken check must not take the probe endpoint down
                problem = f"the check failed: {exc}"
            verdicts[name] = problem or "ok"
        return verdicts

    def start(self) -> int:
        """Listen and return the port (the one asked for, or the free one port 0 picked)."""
        import uvicorn  # noqa: PLC0415  (only with a port: the kernel stays light)

        settings = self.settings
        token = read_token(settings.token_file) if settings.token_file is not None else None
        guarded = Guard(
            self._app(),
            token=token,
            client_certificates=settings.tls_client_ca is not None,
            secure=settings.tls_cert is not None,
        )
        config = uvicorn.Config(
            guarded,
            host=settings.host,
            port=settings.port or 0,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http=peer_certificate_protocol(),
            **uvicorn_tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca),
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=self._serve, args=(server,), name=f"{self.process}-http", daemon=True
        )
        self._thread.start()
        while not server.started:
            if not self._thread.is_alive():  # uvicorn could not bind, and said so in its log
                raise ConfigError(
                    "http",
                    [
                        (
                            "http.port",
                            f"cannot listen on {self.settings.host}:{self.settings.port} "
                            "(in use, or not an address of this host)",
                        )
                    ],
                )
            time.sleep(0.01)  # uvicorn signals readiness only through this flag
        sockets = [s for srv in server.servers for s in srv.sockets]
        self.port = int(sockets[0].getsockname()[1])
        log.info(
            "%s health endpoints on %s://%s:%d (/healthz, /readyz, /metrics)%s",
            self.process,
            settings.scheme,
            settings.host,
            self.port,
            "; the page, /status and /metrics need credentials" if guarded.enabled else "",
        )
        return self.port

    def _registry(self) -> Any:
        """A registry of this server's own: the process collectors and the process's metrics
        (the default registry is global, and a process may start more than one server)."""
        from prometheus_client import (  # noqa: PLC0415
            GC_COLLECTOR,
            PLATFORM_COLLECTOR,
            PROCESS_COLLECTOR,
            CollectorRegistry,
        )

        registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR, *self.collectors):
            registry.register(collector)
        return registry

    @staticmethod
    def _serve(server: Any) -> None:
        try:
            server.run()
        except SystemExit:  # uvicorn's answer to a port it cannot bind; start() reports it
            return

    def linger(self, note: str) -> None:
        """Stay up after the job, ready and serving, until SIGTERM or SIGINT.

        A pod's process that exits is started again (Deployments and StatefulSets restart
        every exit), and a finished job started again would only wait for sites that left.
        With ``--after-finish wait`` the process ends its job and then waits here instead."""
        done = threading.Event()

        def stop(signum: int, frame: object) -> None:
            done.set()

        previous = signal.signal(signal.SIGTERM, stop)
        self.checks = {"job": lambda: None}  # the job is over: nothing left to be ready for
        log.info("%s; waiting for SIGTERM (--after-finish wait)", note)
        try:
            while not done.wait(1.0):  # wakes to let Python run the signal handler
                pass
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)

    def _app(self) -> Any:
        from starlette.applications import Starlette  # noqa: PLC0415
        from starlette.requests import Request  # noqa: PLC0415
        from starlette.responses import JSONResponse, Response  # noqa: PLC0415
        from starlette.routing import Route  # noqa: PLC0415

        async def healthz(request: Request) -> JSONResponse:
            return JSONResponse({"status": "alive", "process": self.process})

        def readyz(request: Request) -> JSONResponse:  # sync: Starlette runs it in a thread
            verdicts = self.readiness()
            ready = all(v == "ok" for v in verdicts.values())
            return JSONResponse(
                {"ready": ready, "process": self.process, "checks": verdicts},
                status_code=200 if ready else 503,
            )

        registry = self._registry()

        def metrics(request: Request) -> Response:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: PLC0415

            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

        def status(request: Request) -> JSONResponse:
            if self.status is None:
                return JSONResponse(
                    {"error": "no status yet", "reason": f"the {self.process} has not started"},
                    status_code=503,
                )
            return JSONResponse(dict(self.status()))

        async def not_found(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse(
                {
                    "error": "not found",
                    "reason": f"{request.url.path}: try /healthz, /readyz, /metrics or /status",
                },
                status_code=404,
            )

        async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse(
                {"error": "method not allowed", "reason": f"{request.method}: only GET"},
                status_code=405,
            )

        def page(request: Request) -> Response:
            media_type, body = self.pages[request.url.path]
            return Response(body, media_type=media_type, headers=PAGE_HEADERS)

        return Starlette(
            routes=[
                *(Route(path, page) for path in self.pages),
                Route("/healthz", healthz),
                Route("/readyz", readyz),
                Route("/metrics", metrics),
                Route("/status", status),
            ],
            exception_handlers={404: not_found, 405: not_allowed},
        )


def start_health(
    settings: HttpSettings,
    checks: Mapping[str, Check],
    process: str,
    *,
    collectors: Sequence[Any] = (),
    pages: Mapping[str, tuple[str, bytes]] | None = None,
) -> HealthServer | None:
    """A started server when ``settings.port`` is set; ``None`` when health HTTP is off."""
    if settings.port is None:
        return None
    server = HealthServer(settings, checks, process, collectors=collectors, pages=pages)
    server.start()
    return server


# -- checks both processes use ---------------------------------------------------------------------


def connected(transport: Callable[[], Any]) -> Check:
    """Ready only while the broker connection is up (``transport()`` may be None: not yet)."""

    def check() -> str | None:
        current = transport()
        if current is None:
            return "not connected to the broker yet"
        return None if current.connected else "the broker connection is down (reconnecting)"

    return check


def writable(folder: Path) -> Check:
    """Ready only while ``folder`` takes a file: a full or read-only volume means no checkpoint."""

    def check() -> str | None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=".probe-", dir=folder)
            os.close(handle)
            os.unlink(name)
        except OSError as exc:
            return f"{folder} is not writable: {exc.strerror or exc}"
        return None

    return check


def certificate_valid(path: Path | None, min_days: float) -> Check:
    """Ready only while the process's certificate lives at least ``min_days`` longer."""

    def check() -> str | None:
        if path is None:
            return None  # plaintext on loopback (broker.insecure): no certificate to expire
        from medsplit.security.pki import PkiError, days_left  # noqa: PLC0415

        try:
            days = days_left(path)
        except PkiError as exc:
            return str(exc)
        if days < min_days:
            return f"{path}: the certificate expires in {days:.1f} days (< {min_days:g}); renew it"
        return None

    return check
