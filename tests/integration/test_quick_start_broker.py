"""The README's quick start, broker part, run as written: `medsplit provision ... --out fed/`
then `mosquitto -c fed/mosquitto/mosquitto.conf`, by whoever runs the tests (root in CI, where
Mosquitto drops to its own user before it reads its key) and by another account that will run
the broker; a site's kit then connects over mutual TLS and the aggregator hears it."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from medsplit.brokers.mosquitto import find_mosquitto, free_port, wait_for_port
from medsplit.transport import MqttSettings, MqttTransport, TlsSettings

pytestmark = pytest.mark.integration
MEDSPLIT = [sys.executable, "-m", "medsplit"]


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A folder everyone may enter, as /srv or a home directory would be: not pytest's own
    temporary folder, which only its owner can enter."""
    folder = Path(tempfile.mkdtemp(prefix="medsplit-quick-start-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _provision(workdir: Path, port: int, *extra: str) -> str:
    """`medsplit provision` as in the README (with a free port)."""
    command = [*MEDSPLIT, "provision", "--job", "cxr-2027", "--sites", "hospital-a,hospital-b",
               "--broker-host", "localhost", "--port", str(port), "--out", "fed/", *extra]  # fmt: skip
    done = subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _as_user(command: list[str], user: str | None) -> list[str]:
    return command if user is None else ["runuser", "-u", user, "--", *command]


def _start_broker(workdir: Path, port: int, user: str | None = None) -> subprocess.Popen[bytes]:
    """The README's command, exactly: `mosquitto -c fed/mosquitto/mosquitto.conf`."""
    command = _as_user([find_mosquitto(), "-c", "fed/mosquitto/mosquitto.conf"], user)
    broker = subprocess.Popen(command, cwd=workdir, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, 15.0, broker)
    except (RuntimeError, TimeoutError):
        broker.kill()
        _, err = broker.communicate()
        raise AssertionError(f"the broker did not start: {err.decode(errors='replace')}") from None
    return broker


def _connect(workdir: Path, port: int, identity: str) -> MqttTransport:
    kit = workdir / "fed" / identity
    tls = TlsSettings(ca_file=kit / "ca.pem", cert_file=kit / "cert.pem", key_file=kit / "key.pem")
    settings = MqttSettings(
        host="localhost", port=port, client_id=f"{identity}-{uuid.uuid4().hex[:6]}", tls=tls,
        connect_timeout_s=5, retry_for_s=2,
    )  # fmt: skip
    transport = MqttTransport(settings)
    transport.connect()
    return transport


def _a_site_is_heard(workdir: Path, port: int) -> None:
    aggregator = _connect(workdir, port, "aggregator")
    site = _connect(workdir, port, "hospital-a")
    try:
        aggregator.subscribe("medsplit/v1/cxr-2027/+/up/+")
        site.publish("medsplit/v1/cxr-2027/hospital-a/up/hello", b"hello")
        message = aggregator.receive(10)
        assert message is not None and message.payload == b"hello"
    finally:
        site.close()
        aggregator.close()


def _stop(broker: subprocess.Popen[bytes]) -> None:
    broker.terminate()
    broker.wait(10)


def test_the_quick_start_broker_starts_as_written_for_whoever_provisions_it(
    workdir: Path,
) -> None:
    port = free_port()
    said = _provision(workdir, port)
    broker = _start_broker(workdir, port)
    try:
        _a_site_is_heard(workdir, port)
    finally:
        _stop(broker)
    conf = (workdir / "fed/mosquitto/mosquitto.conf").read_text().splitlines()
    if os.geteuid() == 0:  # Mosquitto drops to its user: provisioning handed it the key
        owner = pwd.getpwuid((workdir / "fed/mosquitto/server.key").stat().st_uid).pw_name
        assert "user mosquitto" in conf and owner == "mosquitto"
        assert "belong to 'mosquitto', the broker user" in said
        assert list((workdir / "fed/mosquitto/data").iterdir())  # it could save its state
    else:
        assert not any(line.startswith("user ") for line in conf)


def test_a_broker_for_another_user_starts_as_written_by_that_user(workdir: Path) -> None:
    """Provisioned by root for the account that will run the broker (`--broker-user`), the
    README's command works for that account; run by anyone else, the broker is theirs."""
    port = free_port()
    if os.geteuid() != 0:
        _provision(workdir, port)
        _stop(_start_broker(workdir, port))
        return
    _provision(workdir, port, "--broker-user", "nobody")
    key = workdir / "fed/mosquitto/server.key"
    assert pwd.getpwuid(key.stat().st_uid).pw_name == "nobody" and key.stat().st_mode & 0o077 == 0
    broker = _start_broker(workdir, port, user="nobody")
    try:
        _a_site_is_heard(workdir, port)
    finally:
        _stop(broker)


def test_a_folder_the_broker_user_cannot_enter_keeps_the_broker_root_and_says_why(
    tmp_path: Path,
) -> None:
    """pytest's own folder is 0700, as /root is: a broker started there by root stays root."""
    port = free_port()
    said = _provision(tmp_path, port)
    if os.geteuid() != 0:
        assert "runs as root" not in said
        return
    assert "Mosquitto runs as root, because 'mosquitto' cannot enter" in said
    assert "user root" in (tmp_path / "fed/mosquitto/mosquitto.conf").read_text().splitlines()
    _stop(_start_broker(tmp_path, port))
