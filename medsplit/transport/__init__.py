"""Moving bytes and envelopes through MQTT. ``mqtt`` is the only module that imports paho."""

from typing import TYPE_CHECKING

from medsplit.lazy import lazy_exports

if TYPE_CHECKING:
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
    from medsplit.transport.memory import MemoryBroker, MemoryTransport
    from medsplit.transport.mqtt import MqttTransport
    from medsplit.transport.settings import MqttSettings, TlsSettings

_EXPORTS = {
    "ConnectFailed": "medsplit.transport.base",
    "Delivery": "medsplit.transport.acks",
    "Inbound": "medsplit.transport.base",
    "MemoryBroker": "medsplit.transport.memory",
    "MemoryTransport": "medsplit.transport.memory",
    "MqttSettings": "medsplit.transport.settings",
    "MqttTransport": "medsplit.transport.mqtt",
    "PublishRejected": "medsplit.transport.base",
    "PublishTimeout": "medsplit.transport.base",
    "SubscribeFailed": "medsplit.transport.base",
    "TlsSettings": "medsplit.transport.settings",
    "Transport": "medsplit.transport.base",
    "TransportClosed": "medsplit.transport.base",
    "TransportError": "medsplit.transport.base",
    "Will": "medsplit.transport.base",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "ConnectFailed",
    "Delivery",
    "Inbound",
    "MemoryBroker",
    "MemoryTransport",
    "MqttSettings",
    "MqttTransport",
    "PublishRejected",
    "PublishTimeout",
    "SubscribeFailed",
    "TlsSettings",
    "Transport",
    "TransportClosed",
    "TransportError",
    "Will",
]
