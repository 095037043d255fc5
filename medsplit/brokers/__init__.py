"""Brokers for trials and tests: a local Mosquitto, or an embedded amqtt when none is installed."""
