"""Run the inference service: REST on uvicorn (``--port``, 8080) and the Open Inference
Protocol's gRPC on grpcio (``--grpc-port``, 8081), one model and one set of TLS files for both:
``medsplit serve --model model.onnx``."""

from __future__ import annotations

import gc
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvicorn

from edge_agent.serving.app import Limits, create_app
from edge_agent.serving.oip import ServedModel
from edge_agent.serving.oip_grpc import GrpcOptions, build_grpc_server
from edge_agent.serving.predictor import Device, ModelLoadError, Predictor
from medsplit.http_guard import Guard, peer_certificate_protocol, uvicorn_tls

log = logging.getLogger(__name__)
# Open to anyone who reaches the port, as Kubernetes' probes do; the rest needs credentials.
OPEN_PATHS = frozenset({"/healthz", "/v2/health/live", "/v2/health/ready"})


@dataclass(frozen=True)
class ServeOptions:
    model: Path
    host: str = "127.0.0.1"
    port: int = 8080
    device: Device = "cpu"
    threads: int = 0
    limits: Limits = Limits()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Clients must present a certificate signed by this CA (mutual TLS for inference clients).
    tls_client_ca: Path | None = None
    name: str | None = None  # /v2/models/NAME; default: the ONNX file's stem
    grpc_port: int | None = None  # the protocol's gRPC service; None: REST only (0: any port)


@dataclass
class Service:
    """The REST server and, when asked for, the gRPC server of one model (not yet started)."""

    http: uvicorn.Server
    grpc: grpc.Server | None = None
    grpc_port: int | None = None

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve until uvicorn stops (SIGINT, SIGTERM or ``http.should_exit``), gRPC with it."""
        if self.grpc is not None:
            self.grpc.start()
            log.info("Open Inference Protocol over gRPC on port %s", self.grpc_port)
        try:
            self.http.run(sockets=sockets)
        finally:
            if self.grpc is not None:
                self.grpc.stop(grace=5).wait()


def build_service(options: ServeOptions) -> Service:
    """The configured servers; loading the model, and taking the gRPC port, fail here, early."""
    predictor = Predictor(options.model, device=options.device, threads=options.threads)
    model = ServedModel(options.name or predictor.path.stem, predictor, options.limits.max_batch)
    app = create_app(model, options.limits)
    # Mutual TLS: a client certificate is asked for at the handshake and required by the
    # guard on every path but the health checks, which the kubelet calls without one.
    guarded = Guard(
        app,
        token=None,
        client_certificates=options.tls_client_ca is not None,
        secure=options.tls_cert is not None,
        open_paths=OPEN_PATHS,
    )
    config = uvicorn.Config(
        guarded,
        host=options.host,
        port=options.port,
        log_level="info",
        access_log=False,  # request counts and latencies are in /metrics
        http=peer_certificate_protocol(),
        **uvicorn_tls(options.tls_cert, options.tls_key, options.tls_client_ca),
        # asyncio sets TCP_NODELAY on every accepted connection (Python >= 3.7).
    )
    card = predictor.card
    log.info(
        "serving %s (site %s, job %s, %s) on %s with %s",
        options.model,
        card.site_id,
        card.job_id,
        card.plan.model.name,
        options.device,
        predictor.session.get_providers()[0],
    )
    service = Service(uvicorn.Server(config))
    if options.grpc_port is not None:
        service.grpc, service.grpc_port = build_grpc_server(
            model,
            GrpcOptions(
                host=options.host,
                port=options.grpc_port,
                max_message_bytes=options.limits.max_body_bytes,
                tls_cert=options.tls_cert,
                tls_key=options.tls_key,
                tls_client_ca=options.tls_client_ca,
            ),
        )
    return service


def serve(options: ServeOptions, sock: socket.socket | None = None) -> None:
    """Serve until interrupted; ``sock`` is an already bound socket (tests bind port 0)."""
    service = build_service(options)
    # Everything loaded so far (torch, onnxruntime, the app) lives as long as the process: out
    # of the garbage collector's sight, its full collections stay short (the p99 of requests).
    gc.freeze()
    service.run(sockets=[sock] if sock is not None else None)


def await_model(path: Path, timeout_s: float = 0, every_s: float = 30.0) -> Predictor:
    """Wait until the job writes ``path`` (the agent writes it atomically when the job
    finishes), saying so every ``every_s``; then load it, proving it is a model medsplit
    serves. ``timeout_s`` 0 waits for ever (a serving pod's init container)."""
    started = time.monotonic()
    said = started - every_s
    while not path.is_file():
        now = time.monotonic()
        if timeout_s and now - started > timeout_s:
            raise ModelLoadError(f"{path}: not written within {timeout_s:g} s")
        if now - said >= every_s:
            log.info(
                "waiting for %s: the site's agent writes it when the job finishes "
                "(export_onnx: true); %.0f s so far",
                path,
                now - started,
            )
            said = now
        time.sleep(1.0)  # a file appearing has no event to wait on across containers
    return Predictor(path)
