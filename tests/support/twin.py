"""A hostile hospital: a client holding a site's real certificate that speaks for that site.

It connects to the provisioned Mosquitto with the site's own kit (mutual TLS, the site's ACL),
says hello, and answers the aggregator's requests with whatever a test tells it to: mistyped
metadata, poisoned weights, inflated sample counts. It also sends what no honest agent would:
floods, messages it never finishes, retained messages, oversized packets.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from medsplit.protocol import Kind, topics
from medsplit.transport import MqttSettings, MqttTransport, TlsSettings
from medsplit.wire import Decoder, Envelope, encode

Answer = Callable[[Envelope], Envelope | None]


def kit_client(kits: Path, port: int, identity: str, name: str) -> MqttTransport:
    """A client of the provisioned broker on loopback ``port``, holding ``identity``'s own
    certificate from its kit (so the broker's ACL for that identity applies)."""
    kit = kits / identity
    settings = MqttSettings(
        host="127.0.0.1",
        port=port,
        client_id=f"{name}-{uuid.uuid4().hex[:8]}",
        tls=TlsSettings(
            ca_file=kit / "ca.pem", cert_file=kit / "cert.pem", key_file=kit / "key.pem"
        ),
        connect_timeout_s=10,
        retry_for_s=10,
        publish_timeout_s=5,
    )
    return MqttTransport(settings)


class Twin:
    def __init__(self, kits: Path, port: int, job: str, site: str) -> None:
        self.job, self.site = job, site
        self.transport = kit_client(kits, port, site, "twin")
        for topic_filter in topics.site_subscriptions(job, site):
            self.transport.subscribe(topic_filter)
        self.transport.connect()
        self.decoder = Decoder(dedup_window=10**6)
        self.sent_bytes = 0

    def envelope(self, kind: str, **fields: Any) -> Envelope:
        return Envelope(self.job, self.site, kind, **fields)

    def send(self, envelope: Envelope, *, retain: bool = False, frames: int | None = None) -> None:
        """Publish ``envelope`` on the site's uplink (only its first ``frames`` frames)."""
        topic = topics.up(self.job, self.site, envelope.kind)
        for frame in encode(envelope)[:frames]:
            self.transport.publish(topic, frame, retain=retain)
            self.sent_bytes += len(frame)

    def publish_raw(self, kind: str, payload: bytes, *, retain: bool = False) -> None:
        self.transport.publish(topics.up(self.job, self.site, kind), payload, retain=retain)
        self.sent_bytes += len(payload)

    def hello(self, incarnation: str, train_samples: int = 150) -> None:
        meta = {"train_samples": train_samples, "test_samples": 40, "incarnation": incarnation}
        self.send(self.envelope(Kind.HELLO, meta=meta))

    def serve(self, answer: Answer, until: Callable[[], bool]) -> None:
        """Answer every request that arrives with ``answer(request)`` until ``until()``."""
        while not until():
            inbound = self.transport.receive(0.2)
            if inbound is None or topics.is_presence(inbound.topic):
                continue
            request = self.decoder.feed(inbound.payload)
            if request is not None:
                reply = answer(request)
                if reply is not None:
                    self.send(reply)

    def close(self) -> None:
        self.transport.close()


def rss_mb(pid: int) -> float:
    """The resident size of process ``pid``, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for process {pid}")


def abandon_messages(
    twin: Twin, pid: int, await_timeouts: Callable[[], None], messages: int = 16
) -> tuple[float, float, float]:
    """``messages`` messages of 120 frames of 256 KiB, each without its last frame, sent to
    the aggregator (process ``pid``): its RSS in MiB before, at the peak, and once
    ``await_timeouts`` returned (it waits until every one timed out)."""
    before, peak, done = rss_mb(pid), 0.0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb(pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for _ in range(messages):
            weights = {"w": torch.randn(120 * 256 * 1024 // 4 - 64)}
            twin.send(twin.envelope(Kind.DONE, tensors=weights, meta={"samples": 1}), frames=119)
        await_timeouts()
    finally:
        done.set()
        sampler.join()
    return before, peak, rss_mb(pid)


def scaled(weights: Mapping[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    return {k: v * factor if v.is_floating_point() else v for k, v in weights.items()}


def noise(weights: Mapping[str, torch.Tensor], std: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        k: torch.randn(v.shape, generator=generator) * std if v.is_floating_point() else v
        for k, v in weights.items()
    }


class Listener:
    """Every frame one identity may read, kept as it arrived."""

    def __init__(self, kits: Path, port: int, identity: str, filters: list[str]) -> None:
        self.transport = kit_client(kits, port, identity, "listener")
        for topic_filter in filters:
            self.transport.subscribe(topic_filter)
        self.transport.connect()
        self.frames: list[tuple[str, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            inbound = self.transport.receive(0.2)
            if inbound is not None and not topics.is_presence(inbound.topic):
                self.frames.append((inbound.topic, inbound.payload))

    def close(self) -> list[tuple[str, bytes]]:
        self._stop.set()
        self._thread.join(10)
        self.transport.close()
        return self.frames
