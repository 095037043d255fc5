"""Moving bytes and envelopes through MQTT. ``mqtt`` is the only module that imports paho."""

from medsplit.transport.acks import Delivery
from medsplit.transport.base import (
    ConnectFailed,
    Inbound,
    PublishRejected,
    PublishTimeout,
    SubscribeFailed,
    Transport,
    TransportClosed,
    TransportError,
    Will,
)
from medsplit.transport.endpoint import Endpoint, EndpointStats, Received
from medsplit.transport.memory import MemoryBroker, MemoryTransport
from medsplit.transport.mqtt import MqttTransport
from medsplit.transport.settings import MqttSettings, TlsSettings

__all__ = [
    "ConnectFailed",
    "Delivery",
    "Endpoint",
    "EndpointStats",
    "Inbound",
    "MemoryBroker",
    "MemoryTransport",
    "MqttSettings",
    "MqttTransport",
    "PublishRejected",
    "PublishTimeout",
    "Received",
    "SubscribeFailed",
    "TlsSettings",
    "Transport",
    "TransportClosed",
    "TransportError",
    "Will",
]
