"""A local Orthanc PACS with its DICOMweb plugin, on a free loopback port, from a generated JSON.

The tests, the benchmark and the PACS demo need a real archive to read from: Debian's ``orthanc``
and ``orthanc-dicomweb`` (``scripts/setup.sh`` installs them), started like Mosquitto as a child
process with a configuration written here -- HTTP on 127.0.0.1 only, HTTP basic authentication
with one user, no DICOM (DIMSE) port, storage in a folder of its own. A hospital's archive is
its own; this is one machine's stand-in for it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from medsplit.brokers.mosquitto import free_port, wait_for_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def find_orthanc() -> str:
    for candidate in (shutil.which("Orthanc"), "/usr/sbin/Orthanc"):
        if candidate and os.access(candidate, os.X_OK):
            if not DICOMWEB_PLUGIN.exists():
                break
            return candidate
    raise RuntimeError(
        "Orthanc with its DICOMweb plugin is not installed: `make setup` installs Debian's "
        "'orthanc' and 'orthanc-dicomweb'"
    )


@dataclass(frozen=True)
class OrthancTls:
    """HTTPS with client certificates: Orthanc's certificate and key, the CA its clients'
    certificates must chain to, and the client identity the launcher itself uploads with."""

    cert: Path
    key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path


class Orthanc:
    """Start with ``start()``, stop with ``stop()`` (or use as a context manager).

    ``kill()`` then ``start()`` brings it back on the same port with the same studies, as a
    restarted archive does. With ``tls``, clients reach it through HTTPS only, on a
    TLS-terminating front that refuses a client without a certificate from ``tls.client_ca``
    (and Orthanc still asks for the password) -- the way many hospitals put a reverse proxy in
    front of their archive. Orthanc's own HTTPS is not used: in Debian bookworm's build (1.10.1,
    CivetWeb on OpenSSL 3) it resets every connection after the handshake.
    """

    def __init__(
        self, workdir: Path, *, user: str = "medsplit", tls: OrthancTls | None = None
    ) -> None:
        self.workdir = workdir
        self.tls = tls
        self.user, self.password = user, secrets.token_urlsafe(16)
        self.port = free_port()  # where clients connect
        self.orthanc_port = free_port() if tls else self.port
        self._front: TlsFront | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "orthanc.log"

    @property
    def url(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS and STOW-RS below it)."""
        return f"{self.rest_url}/dicom-web"

    @property
    def rest_url(self) -> str:
        """Orthanc's own REST API (the tests use it to break a stored instance on purpose)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def config(self) -> dict[str, object]:
        return {
            "Name": "medsplit-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "HttpPort": self.orthanc_port,
            "RemoteAccessAllowed": False,  # loopback only
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "DicomServerEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpCompressionEnabled": False,
            "ConcurrentJobs": 1,
            "MaximumStorageCacheSize": 0,  # every answer read from storage, as after a restart
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        }

    def start(self) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [find_orthanc(), str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_for_port(self.orthanc_port, 30.0, self.process)
            if self.tls is not None:
                self._front = TlsFront(self.tls, self.port, self.orthanc_port)
            self._wait_for_dicomweb(30.0)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"Orthanc did not start: {exc}\n{self._log_tail()}") from exc
        return self

    def _wait_for_dicomweb(self, timeout: float) -> None:
        """Until the plugin answers QIDO-RS (the HTTP port opens before plugins are loaded)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.client() as client:
                    answer = client.get(f"{self.url}/studies")
                if answer.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"DICOMweb at {self.url} did not answer within {timeout:g} s")
            time.sleep(0.05)  # polling the endpoint whose answer is the readiness itself

    def _log_tail(self) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])

    def upload(self, files: list[Path]) -> int:
        """Store DICOM files through Orthanc's REST API (``POST /instances``); the count stored."""
        stored = 0
        with self.client() as client:
            for path in files:
                answer = client.post(f"{self.rest_url}/instances", content=path.read_bytes())
                answer.raise_for_status()
                stored += 1
        return stored

    def client(self) -> httpx.Client:
        """An HTTP client that Orthanc lets in: the password and, with TLS, a certificate."""
        if self.tls is None:
            return httpx.Client(auth=(self.user, self.password), timeout=60)
        context = ssl.create_default_context(cafile=str(self.tls.client_ca))
        context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return httpx.Client(auth=(self.user, self.password), timeout=60, verify=context)

    def stop(self) -> None:
        if self._front is not None:
            self._front.close()
            self._front = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        if self._front is not None:
            self._front.close()
            self._front = None
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TlsFront:
    """HTTPS with client certificates in front of a plain-HTTP port: an asyncio server on its
    own thread that verifies each client's certificate and relays the bytes."""

    def __init__(self, tls: OrthancTls, port: int, target_port: int) -> None:
        self.context = ssl.create_default_context(
            ssl.Purpose.CLIENT_AUTH, cafile=str(tls.client_ca)
        )
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_cert_chain(str(tls.cert), str(tls.key))
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(port, started), daemon=True, name="tls-front"
        )
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError(f"the TLS front on 127.0.0.1:{port} did not start")

    def _serve(self, port: int, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", port, ssl=self.context)
        )
        started.set()
        self.loop.run_forever()
        self.loop.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))

    async def _shutdown(self) -> None:
        self.server.close()
        relays = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in relays:
            task.cancel()
        if relays:
            await asyncio.wait(relays, timeout=2)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()
