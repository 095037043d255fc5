"""medsplit: split learning and partial-network federated learning across hospitals, over MQTT."""

__version__ = "0.1.0"
