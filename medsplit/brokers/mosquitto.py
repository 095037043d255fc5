"""A local Mosquitto on a free loopback port with a generated configuration.

Used by the integration tests, the benchmarks and (later) ``medsplit demo``: a real broker,
started as a child process, readable log, stopped on exit. Production deployments run their own
broker (see the Helm chart); this is for one machine.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

RELOADED = "Reloading config."


def find_mosquitto() -> str:
    found = shutil.which("mosquitto")
    for candidate in (found, "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(
        "mosquitto is not installed: `make setup` installs it with apt-get, "
        "or install your distribution's 'mosquitto' package"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(
    port: int, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until something accepts TCP connections on ``port`` (readiness, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"broker exited with status {process.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listening on 127.0.0.1:{port} after {timeout} s"
                ) from None
            time.sleep(0.02)


class Mosquitto:
    """Start with ``start()``, stop with ``stop()`` (or use as a context manager).

    Listens on 127.0.0.1 only; anonymous clients allowed unless ``anonymous=False``; no
    persistence unless ``persistence=True`` (then saved in ``workdir`` every second and on
    exit); unlimited queues (the tests push thousands of QoS 1 messages to sessions that are
    briefly offline). ``kill()`` and ``start()`` again restart it on the same port, as a crashed
    broker comes back.
    """

    def __init__(
        self,
        workdir: Path,
        extra_config: str = "",
        *,
        anonymous: bool = True,
        port: int | None = None,
        persistence: bool = False,
        config_file: Path | None = None,
        verbose: bool = False,
    ) -> None:
        self.workdir = workdir
        self.verbose = verbose  # -v: log every packet (a test reads what reached the broker)
        self.anonymous = anonymous
        self.persistence = persistence
        self.port = port or free_port()
        self.extra_config = extra_config
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "mosquitto.log"
        self.config_file = config_file  # a complete configuration (medsplit provision's)

    @classmethod
    def provisioned(cls, folder: Path, port: int, *, verbose: bool = False) -> Mosquitto:
        """The broker ``medsplit provision`` configured in ``folder`` (its mosquitto/, or a
        hospital broker's bridges/SITE), as is."""
        return cls(folder, port=port, config_file=folder / "mosquitto.conf", verbose=verbose)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def config(self) -> str:
        return "\n".join(
            [
                f"listener {self.port} 127.0.0.1",
                f"allow_anonymous {'true' if self.anonymous else 'false'}",
                *(
                    [
                        "persistence true",
                        f"persistence_location {self.workdir}/",
                        "autosave_interval 1",
                    ]
                    if self.persistence
                    else ["persistence false"]
                ),
                # Run as whoever started the test (as root, mosquitto would drop to its own user).
                f"user {getpass.getuser()}",
                "max_queued_messages 0",
                "max_inflight_messages 0",
                "set_tcp_nodelay true",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                "log_type notice",
                self.extra_config,
                "",
            ]
        )

    def start(self) -> Mosquitto:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.config_file or self.workdir / "mosquitto.conf"
        if self.config_file is None:
            conf.write_text(self.config())
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [find_mosquitto(), "-c", str(conf), *(["-v"] if self.verbose else [])],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_port(self.port, 15.0, self.process)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(
                f"mosquitto did not start: {exc}\n{self.log_path.read_text()}"
            ) from exc
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP: Mosquitto reads its ACL and CRL again; connections stay up. Returns once
        its log says it reloaded (the configuration must log ``information``, as
        ``medsplit provision``'s does)."""
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError("mosquitto is not running")
        before = self._log_text().count(RELOADED)
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._log_text().count(RELOADED) == before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"mosquitto did not log {RELOADED!r} within {timeout:g} s")
            time.sleep(0.02)  # polling the log for the line that says the reload happened

    def _log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without saving or saying goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
