"""Who may read a process's HTTP port: TLS, client certificates and a bearer token.

The aggregator's and the agents' ports show per-site results (the status page, ``/status``,
``/metrics``). With ``http.tls_cert``/``tls_key`` they speak HTTPS; with ``http.tls_client_ca``
a client certificate signed by that CA opens them; with ``http.token_file`` so does
``Authorization: Bearer TOKEN`` (Prometheus' ``bearer_token``), or the cookie a browser gets
by opening the page once as ``/?token=TOKEN``. ``/healthz`` and ``/readyz`` stay open: the
kubelet's probes carry neither.

Client certificates are asked for, not required, at the TLS layer (``CERT_OPTIONAL``: one that
is shown must verify against the CA, or the handshake fails), so a probe without one still
connects; the certificate a connection showed reaches the request through uvicorn's per-request
``state`` (``PeerCertificateProtocol``), and this module's middleware decides per path.
"""

from __future__ import annotations

import hmac
import json
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from models.config_errors import ConfigError

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
COOKIE = "medsplit_token"
MIN_TOKEN_CHARS = 16
PEER_CERTIFICATE = "peer_certificate"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def read_token(path: Path, field: str = "http.token_file") -> str:
    """The bearer token in ``path`` (a mounted Secret), surrounding whitespace dropped."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError("http", [(field, f"{path}: {exc.strerror or exc}")]) from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(
            "http",
            [(field, f"{path}: expected one token of at least {MIN_TOKEN_CHARS} characters")],
        )
    return token


def uvicorn_tls(cert: Path | None, key: Path | None, client_ca: Path | None) -> dict[str, Any]:
    """uvicorn.Config's TLS arguments: HTTPS with ``cert``, client certificates asked for and
    checked against ``client_ca`` (required per path by ``Guard``, not by the handshake)."""
    if cert is None or key is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    if client_ca is not None:
        options |= {"ssl_ca_certs": str(client_ca), "ssl_cert_reqs": ssl.CERT_OPTIONAL}
    return options


def peer_certificate_protocol() -> type:
    """uvicorn's HTTP protocol (httptools when installed, else h11) that puts the certificate
    the connection showed, verified, into each request's ``state``."""
    base: type
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: PLC0415

        base = HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is in every image
        from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: PLC0415

        base = H11Protocol

    class PeerCertificateProtocol(base):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            certificate = transport.get_extra_info("peercert") or None
            state: dict[str, Any] = getattr(self, "app_state", {})
            self.app_state = {**state, PEER_CERTIFICATE: certificate}

    return PeerCertificateProtocol


class Guard:
    """ASGI middleware: every path but the probes needs a client certificate or the token,
    when either is configured; with neither, the port is open as it always was."""

    def __init__(
        self,
        app: App,
        token: str | None,
        client_certificates: bool,
        secure: bool,
        open_paths: frozenset[str] = OPEN_PATHS,
    ):
        self.app, self.token = app, token
        self.client_certificates, self.secure = client_certificates, secure
        self.open_paths = open_paths

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.client_certificates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.enabled or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        if self._certified(scope) or self._token_shown(scope):
            await self.app(scope, receive, send)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        offered = query.get("token", [""])[0]
        if self.token is not None and offered and hmac.compare_digest(offered, self.token):
            await self._set_cookie(scope, send)
            return
        await self._refuse(scope, send)

    def _certified(self, scope: Scope) -> bool:
        state = scope.get("state") or {}
        return self.client_certificates and bool(state.get(PEER_CERTIFICATE))

    def _token_shown(self, scope: Scope) -> bool:
        if self.token is None:
            return False
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip(), self.token):
            return True
        for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value, self.token):
                return True
        return False

    async def _set_cookie(self, scope: Scope, send: Send) -> None:
        """``/?token=...`` once: the browser keeps the token as a cookie, and the page's own
        requests to ``/status`` carry it; the token leaves the address bar."""
        attributes = "HttpOnly; SameSite=Strict; Path=/" + ("; Secure" if self.secure else "")
        headers = [
            (b"location", scope["path"].encode()),
            (b"set-cookie", f"{COOKIE}={self.token}; {attributes}".encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 303, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _refuse(self, scope: Scope, send: Send) -> None:
        ways = []
        if self.token is not None:
            ways.append("a bearer token")
        if self.client_certificates:
            ways.append("a client certificate")
        reason = (
            f"{scope['path']} needs {' or '.join(ways)}; "
            f"{', '.join(sorted(self.open_paths))} are open"
        )
        body = json.dumps({"error": "unauthorized", "reason": reason}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"www-authenticate", b'Bearer realm="medsplit"'),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
