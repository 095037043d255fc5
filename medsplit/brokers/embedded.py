"""An in-process MQTT broker (amqtt) for machines without Mosquitto.

``medsplit demo`` must run with nothing installed beyond the Python package. amqtt is a
maintained asyncio broker; it speaks MQTT 3.1.1 only, so clients of an embedded broker use
``protocol: "3.1.1"`` (QoS 1, persistent sessions and Last Will work the same; MQTT 5 reason
codes are not available). It runs on its own event loop in a daemon thread, on a free loopback
port. Real deployments use Mosquitto (or EMQX) with TLS; this is for one machine.
"""

from __future__ import annotations

import asyncio
import getpass
import tempfile
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsplit.brokers.mosquitto import Mosquitto, find_mosquitto, free_port, wait_for_port

PROTOCOL = "3.1.1"


class EmbeddedBroker:
    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="amqtt-broker", daemon=True
        )
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        from amqtt.broker import Broker  # noqa: PLC0415 - loaded only when no Mosquitto is around

        config = {
            "listeners": {
                "default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}", "max_connections": 256}
            },
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._thread.start()

        async def start_broker() -> Any:
            broker = Broker(config, loop=self._loop)
            await broker.start()
            return broker

        self._broker = asyncio.run_coroutine_threadsafe(start_broker(), self._loop).result(30)
        wait_for_port(self.port, 15.0)
        return self

    def stop(self) -> None:
        if self._broker is not None:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(30)
            self._broker = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class LocalBroker:
    url: str
    protocol: str  # the MQTT version its clients must speak
    description: str
    kits: Path | None = None  # provisioned: one folder of certificates per identity

    def broker_section(self, identity: str) -> dict[str, Any]:
        """The ``broker`` group of ``identity``'s config: its certificates, or, for a plaintext
        loopback broker, ``insecure: true`` said out loud."""
        section: dict[str, Any] = {"url": self.url, "protocol": self.protocol}
        if self.kits is None:
            return {**section, "insecure": True}
        kit = (self.kits / identity).resolve()
        files = {"ca_file": "ca.pem", "cert_file": "cert.pem", "key_file": "key.pem"}
        return {**section, "tls": {name: str(kit / file) for name, file in files.items()}}


def start_local_broker(
    stack: ExitStack,
    *,
    embedded: bool = False,
    provision: tuple[Path, str, list[str]] | None = None,
) -> LocalBroker:
    """A broker for one machine, stopped when ``stack`` closes: Mosquitto when installed (and
    not ``embedded``), otherwise the in-process amqtt broker (plaintext, loopback only).

    With ``provision`` = (folder, job id, site ids), Mosquitto runs with mutual TLS and the ACL
    of a throw-away federation provisioned in that folder."""
    if not embedded:
        try:
            find_mosquitto()
        except RuntimeError:
            pass
        else:
            if provision is not None:
                return _provisioned_mosquitto(stack, *provision)
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="medsplit-broker-"))
            mosquitto = stack.enter_context(Mosquitto(Path(workdir)))
            return LocalBroker(mosquitto.url, "5", f"Mosquitto on {mosquitto.url} (plaintext)")
    broker = stack.enter_context(EmbeddedBroker())
    return LocalBroker(
        broker.url,
        PROTOCOL,
        f"embedded amqtt (MQTT 3.1.1) on {broker.url}: plaintext, loopback only "
        "(install Mosquitto for mutual TLS)",
    )


def _provisioned_mosquitto(
    stack: ExitStack, folder: Path, job: str, sites: list[str]
) -> LocalBroker:
    from medsplit.security.provision import Federation, Provisioner  # noqa: PLC0415

    port = free_port()
    federation = Federation(
        job_id=job,
        sites=sites,
        broker_hosts=["127.0.0.1", "localhost"],
        port=port,
        bind_address="127.0.0.1",
        validity_days=1,
        ca_validity_days=2,
        broker_user=getpass.getuser(),
    )
    Provisioner.create(federation, folder)
    stack.enter_context(Mosquitto.provisioned(folder / "mosquitto", port))
    url = f"mqtts://127.0.0.1:{port}"
    return LocalBroker(
        url, "5", f"Mosquitto on {url}, mutual TLS (certificates in {folder})", kits=folder
    )
