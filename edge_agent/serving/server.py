"""Run the inference service on uvicorn: ``medsplit serve --model model.onnx --port 8080``."""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from edge_agent.serving.app import Limits, create_app
from edge_agent.serving.predictor import Device, Predictor

log = logging.getLogger(__name__)


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


def build_server(options: ServeOptions) -> uvicorn.Server:
    """A configured uvicorn server (not yet started); loading the model fails here, early."""
    predictor = Predictor(options.model, device=options.device, threads=options.threads)
    app = create_app(predictor, options.limits, name=options.name)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level="info",
        access_log=False,  # request counts and latencies are in /metrics
        ssl_certfile=str(options.tls_cert) if options.tls_cert else None,
        ssl_keyfile=str(options.tls_key) if options.tls_key else None,
        # asyncio sets TCP_NODELAY on every accepted connection (Python >= 3.7).
    )
    if options.tls_client_ca is not None:  # mutual TLS: every client shows a certificate
        config.ssl_ca_certs = str(options.tls_client_ca)
        config.ssl_cert_reqs = ssl.CERT_REQUIRED
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
    return uvicorn.Server(config)


def serve(options: ServeOptions, sock: socket.socket | None = None) -> None:
    """Serve until interrupted; ``sock`` is an already bound socket (tests bind port 0)."""
    server = build_server(options)
    server.run(sockets=[sock] if sock is not None else None)
