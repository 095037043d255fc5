"""The one wiring of a party: transport, Last Will and presence, subscriptions, channel.

The aggregator process, the agent process, the demo and the in-process experiment runner all
join a job through ``open_aggregator`` / ``open_site``, so none of them can forget the Last
Will or a subscription. A ``Connector`` makes the transport (``mqtt_connector`` for a real
broker, ``memory_connector`` for the in-memory twin); everything else is the same.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from medsplit.channel import Endpoint
from medsplit.ids import AGGREGATOR_ID
from medsplit.protocol import topics
from medsplit.protocol.presence import Presence, PresenceError, Role
from medsplit.transport.base import Transport, Will
from models.config_errors import ConfigError

if TYPE_CHECKING:
    from medsplit.config import BrokerConfig
    from medsplit.transport.memory import MemoryBroker

log = logging.getLogger(__name__)


class Connector(Protocol):
    def __call__(
        self, client_id: str, *, will: Will | None = None, birth: Will | None = None
    ) -> Transport: ...


class JobAlreadyCoordinated(RuntimeError):
    """Another aggregator is live for this job; a second one must not start."""

    def __init__(self, job_id: str, live: Presence) -> None:
        super().__init__(f"job {job_id} is already coordinated by {live.describe()}")
        self.live = live


def mqtt_connector(
    broker: BrokerConfig, identity: str | None = None, job: str | None = None
) -> Connector:
    """Connections to a real broker. With ``identity``, the client certificate is checked
    first: its CN must be that identity (or ``identity@job``, in a federation of several jobs),
    and it must not have expired (it says when it will)."""
    from medsplit.transport.mqtt import MqttTransport  # noqa: PLC0415 - loads paho

    if identity is not None and broker.tls is not None and broker.tls.cert_file is not None:
        _check_certificate(broker.tls.cert_file, identity, job)

    def connect(
        client_id: str, *, will: Will | None = None, birth: Will | None = None
    ) -> Transport:
        return MqttTransport(broker.settings(client_id[:128]), will=will, birth=birth)

    return connect


def _check_certificate(path: Path, identity: str, job: str | None) -> None:
    from medsplit.security.pki import PkiError, describe_client_certificate  # noqa: PLC0415

    try:
        note, warn = describe_client_certificate(path, identity, job)
    except PkiError as exc:
        raise ConfigError("broker", [("broker.tls.cert_file", str(exc))]) from None
    (log.warning if warn else log.info)("%s", note)


def memory_connector(broker: MemoryBroker) -> Connector:
    from medsplit.transport.memory import MemoryTransport  # noqa: PLC0415

    def connect(
        client_id: str, *, will: Will | None = None, birth: Will | None = None
    ) -> Transport:
        return MemoryTransport(broker, client_id, will=will, birth=birth)

    return connect


@dataclass
class Party:
    """One connected participant of a job."""

    job_id: str
    presence: Presence
    transport: Transport
    endpoint: Endpoint

    @property
    def incarnation(self) -> str:
        return self.presence.incarnation

    def close(self) -> None:
        """Leave cleanly: say offline (the Last Will is only for vanishing), then disconnect."""
        if self.transport.connected:
            try:
                self.transport.publish(
                    topics.presence(self.job_id, self.presence.party),
                    self.presence.gone().to_bytes(),
                    retain=True,
                )
            except Exception as exc:  # leaving must not fail: the broker may already be gone
                log.debug("could not publish offline presence: %s", exc)
        self.transport.close()


def open_site(
    job_id: str, site_id: str, connect: Connector, *, client_id: str | None = None
) -> Party:
    """Connect a site: Last Will, birth presence, its own downlink, broadcasts, aggregator."""
    return _open(job_id, site_id, "site", connect, client_id or f"{job_id}-{site_id}")


def open_aggregator(
    job_id: str,
    connect: Connector,
    *,
    client_id: str | None = None,
    check_timeout_s: float = 30.0,
) -> Party:
    """Connect the aggregator of ``job_id``, refusing if another one is live for the job.

    Each aggregator connects under a client id of its own incarnation, so two of them can never
    take each other's connection over (the broker would close the older one, and each would
    reconnect and close the other, for ever).
    """
    presence = Presence.online(AGGREGATOR_ID, "aggregator")
    base = client_id or f"{AGGREGATOR_ID}-{job_id}"
    live = live_aggregator(job_id, connect, f"{base}-probe-{presence.incarnation}", check_timeout_s)
    if live is not None:
        raise JobAlreadyCoordinated(job_id, live)
    return _open(
        job_id,
        AGGREGATOR_ID,
        "aggregator",
        connect,
        f"{base}-{presence.incarnation}",
        presence=presence,
    )


def live_aggregator(
    job_id: str, connect: Connector, client_id: str, timeout_s: float
) -> Presence | None:
    """The presence of a live aggregator of ``job_id``, if the broker retains one.

    A probe connection subscribes to the aggregator's presence topic, then publishes a
    non-retained ``probe`` there: MQTT keeps one topic's messages in order, so whatever arrives
    before the probe is the retained presence, and the probe arriving first means none.
    """
    topic = topics.aggregator_presence(job_id)
    probe = Presence("probe", "aggregator", "probe", client_id, time.time())
    transport = connect(client_id)
    transport.connect()
    try:
        transport.subscribe(topic)
        transport.publish(topic, probe.to_bytes())
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            inbound = transport.receive(remaining)
            if inbound is None or inbound.topic != topic:
                continue
            try:
                seen = Presence.from_bytes(inbound.payload)
            except PresenceError:
                continue  # someone else's garbage on the topic says nothing about liveness
            if seen.state == "probe":
                if seen.incarnation == client_id:
                    return None
                continue  # another aggregator checking at the same time
            return seen if seen.state == "online" else None
        raise TimeoutError(f"the broker did not echo a presence probe within {timeout_s:g} s")
    finally:
        transport.close()


def _open(
    job_id: str,
    party: str,
    role: Role,
    connect: Connector,
    client_id: str,
    *,
    presence: Presence | None = None,
) -> Party:
    presence = presence or Presence.online(party, role)
    topic = topics.presence(job_id, party)
    transport = connect(
        client_id,
        will=Will(topic, presence.gone().to_bytes()),
        birth=Will(topic, presence.to_bytes()),
    )
    subscriptions = (
        topics.aggregator_subscriptions(job_id)
        if role == "aggregator"
        else topics.site_subscriptions(job_id, party)
    )
    # Subscribed before the birth presence goes out: whoever answers our presence at once (an
    # agent says hello to a new aggregator epoch) must find us listening. The transport sends
    # these subscriptions ahead of the birth message when it connects, and connect() returns
    # once the broker confirmed them.
    for topic_filter in subscriptions:
        transport.subscribe(topic_filter)
    transport.connect()
    return Party(job_id, presence, transport, Endpoint(transport))
