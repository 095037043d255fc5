"""Round-trip latency and throughput through a real Mosquitto: medsplit's transport vs plain paho.

    python bench/transport.py [--write-docs] [--quick]

A Mosquitto is started on a free loopback port. The echo side runs in a child process (as the
aggregator would, on another machine), the measuring side here. The baseline is a bare
paho-mqtt client (MQTT 5, QoS 1, TCP_NODELAY) sending raw bytes; medsplit sends the same
number of tensor bytes as envelopes through ``Endpoint`` (safetensors, sha256, chunking at the
256 KiB default, header and finite-value checks, de-duplication). This file imports paho only to
build that baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import paho.mqtt.client as paho
import torch
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import machine, write_section
from medsplit.brokers.mosquitto import Mosquitto
from medsplit.channel import Endpoint
from medsplit.transport import MqttSettings, MqttTransport
from medsplit.wire import Decoder, Envelope, WireDtype, encode, new_message_id

KB, MB = 1024, 1024 * 1024
TIMEOUT = 60.0


def plain_client(port: int, client_id: str, nodelay: bool) -> paho.Client:
    """A bare paho client, connected, its loop running."""
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    if nodelay:
        client.on_socket_open = lambda c, u, s: s.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
    client.max_inflight_messages_set(64)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    if not connected.wait(10):
        raise TimeoutError(f"{client_id} could not connect")
    return client


def subscribe_plain(client: paho.Client, topic: str) -> None:
    acked = threading.Event()
    client.on_subscribe = lambda *args: acked.set()
    client.subscribe(topic, qos=1)
    if not acked.wait(10):
        raise TimeoutError(f"no SUBACK for {topic}")


# -- the echo process ------------------------------------------------------------------------------


def serve_echo(port: int) -> None:
    """Echo pings back as pongs and acknowledge stream messages, until stdin closes."""
    for tag, nodelay in (("nodelay", True), ("nagle", False)):
        client = plain_client(port, f"echo-{tag}", nodelay)
        base = f"bench/{tag}"
        client.message_callback_add(
            f"{base}/ping", lambda c, u, m, b=base: c.publish(f"{b}/pong", m.payload, qos=1)
        )
        client.message_callback_add(
            f"{base}/stream", lambda c, u, m, b=base: c.publish(f"{b}/ack", b"1", qos=1)
        )
        subscribe_plain(client, f"{base}/ping")
        subscribe_plain(client, f"{base}/stream")

    transport = MqttTransport(MqttSettings(port=port, client_id="echo-medsplit"))
    transport.connect()
    transport.subscribe("bench/ms/ping")
    transport.subscribe("bench/ms/stream")
    endpoint = Endpoint(transport)

    def loop() -> None:
        while True:
            received = endpoint.receive(timeout=1.0)
            if received is None:
                continue
            env = received.envelope
            if received.topic.endswith("/stream"):
                transport.publish("bench/ms/ack", b"1")
                continue
            wire_dtype: WireDtype = env.meta.get("wire_dtype", "float32")  # type: ignore[assignment]
            reply = Envelope(env.job, env.site, env.kind, tensors=env.tensors)
            endpoint.send("bench/ms/pong", reply, wire_dtype=wire_dtype)

    threading.Thread(target=loop, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()


# -- the measuring side -----------------------------------------------------------------------------


class PlainPing:
    def __init__(self, port: int, nodelay: bool) -> None:
        self.base = "bench/nodelay" if nodelay else "bench/nagle"
        self.client = plain_client(port, f"ping-{self.base[6:]}", nodelay)
        self.pong = threading.Event()
        self.acks = threading.Semaphore(0)
        self.client.message_callback_add(f"{self.base}/pong", lambda *a: self.pong.set())
        self.client.message_callback_add(f"{self.base}/ack", lambda *a: self.acks.release())
        subscribe_plain(self.client, f"{self.base}/pong")
        subscribe_plain(self.client, f"{self.base}/ack")

    def round_trip(self, payload: bytes) -> None:
        self.pong.clear()
        self.client.publish(f"{self.base}/ping", payload, qos=1).wait_for_publish(TIMEOUT)
        if not self.pong.wait(TIMEOUT):
            raise TimeoutError("no pong")

    def stream(self, payload: bytes, count: int) -> None:
        infos = [self.client.publish(f"{self.base}/stream", payload, qos=1) for _ in range(count)]
        for info in infos:
            info.wait_for_publish(TIMEOUT)
        for _ in range(count):
            if not self.acks.acquire(timeout=TIMEOUT):
                raise TimeoutError("stream stalled")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class MedsplitPing:
    def __init__(self, port: int) -> None:
        self.transport = MqttTransport(MqttSettings(port=port, client_id="ping-medsplit"))
        self.transport.connect()
        self.transport.subscribe("bench/ms/pong")
        self.transport.subscribe("bench/ms/ack")
        self.endpoint = Endpoint(self.transport)
        self.wire_dtype: WireDtype = "float32"

    def _fresh(self, envelope: Envelope) -> Envelope:
        # A new message id each time: the receiver would drop a repeated one as a duplicate.
        return dataclasses.replace(
            envelope, msg_id=new_message_id(), meta={"wire_dtype": self.wire_dtype}
        )

    def round_trip(self, envelope: Envelope) -> None:
        self.endpoint.send("bench/ms/ping", self._fresh(envelope), wire_dtype=self.wire_dtype)
        if self.endpoint.receive(timeout=TIMEOUT) is None:
            raise TimeoutError("no pong")

    def stream(self, envelope: Envelope, count: int) -> None:
        # Like the baseline: publish everything, then wait for the acknowledgements.
        for _ in range(count):
            self.endpoint.send(
                "bench/ms/stream", self._fresh(envelope), wire_dtype=self.wire_dtype, wait=False
            )
        self.endpoint.flush()
        for _ in range(count):
            if self.transport.receive(timeout=TIMEOUT) is None:
                raise TimeoutError("stream stalled")

    def close(self) -> None:
        self.transport.close()


@dataclasses.dataclass
class Timing:
    p50_ms: float
    p90_ms: float


def measure(action: Callable[[], None], repeats: int, warmup: int = 3) -> Timing:
    for _ in range(warmup):
        action()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return Timing(statistics.median(samples), samples[int(0.9 * (len(samples) - 1))])


def tensor_of(nbytes: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(max(1, nbytes // 4))}


def _label(size: int) -> str:
    return f"{size // KB} KB" if size < MB else f"{size // MB} MB"


def latency_table(plain: PlainPing, ms: MedsplitPing, sizes: list[tuple[int, int]]) -> list[str]:
    lines = [
        "| round trip | plain paho p50 | medsplit fp32 p50 | ratio | medsplit fp16 p50 | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for size, repeats in sizes:
        base = measure(partial(plain.round_trip, bytes(size)), repeats)
        envelope = Envelope("bench", "ping", "x", tensors=tensor_of(size))
        ms.wire_dtype = "float32"
        fp32 = measure(partial(ms.round_trip, envelope), repeats)
        ms.wire_dtype = "float16"
        fp16 = measure(partial(ms.round_trip, envelope), repeats)
        lines.append(
            f"| {_label(size)} | {base.p50_ms:.2f} ms | {fp32.p50_ms:.2f} ms "
            f"| {fp32.p50_ms / base.p50_ms:.2f}x | {fp16.p50_ms:.2f} ms | {fp16.p50_ms / base.p50_ms:.2f}x |"
        )
        print(lines[-1], flush=True)
    return lines


def throughput_table(plain: PlainPing, ms: MedsplitPing, size: int, count: int) -> list[str]:
    total_mb = size * count / MB
    seconds = {
        "plain": measure(partial(plain.stream, bytes(size), count), 3, warmup=1).p50_ms / 1000
    }
    envelope = Envelope("bench", "ping", "x", tensors=tensor_of(size))
    for dtype in ("float32", "float16"):
        ms.wire_dtype = dtype  # type: ignore[assignment]
        seconds[dtype] = measure(partial(ms.stream, envelope, count), 3, warmup=1).p50_ms / 1000
    rate = {k: total_mb / v for k, v in seconds.items()}
    lines = [
        f"| {count} x {_label(size)}, one way | plain paho | medsplit fp32 | medsplit fp16 |",
        "|---|---|---|---|",
        f"| tensor MB/s | {rate['plain']:.0f} | {rate['float32']:.0f} ({rate['float32'] / rate['plain']:.2f}x of plain) "
        f"| {rate['float16']:.0f} ({rate['float16'] / rate['plain']:.2f}x of plain) |",
    ]
    print(lines[-1], flush=True)
    return lines


def codec_table(repeats: int) -> list[str]:
    """Where medsplit's time goes: encoding and decoding alone, in this process, no network."""
    lines = ["| codec only | encode | decode | per MB (encode + decode) |", "|---|---|---|---|"]
    for size in (KB, 4 * MB):
        envelope = Envelope("bench", "ping", "x", tensors=tensor_of(size))
        frames = encode(envelope)
        enc = measure(partial(encode, envelope), repeats)

        def decode_all(frames: list[bytes] = frames) -> None:
            decoder = Decoder()
            for frame in frames:
                decoder.feed(frame)

        dec = measure(decode_all, repeats)
        per_mb = f"{(enc.p50_ms + dec.p50_ms) / (size / MB):.2f} ms" if size >= MB else "-"
        lines.append(f"| {_label(size)} | {enc.p50_ms:.3f} ms | {dec.p50_ms:.3f} ms | {per_mb} |")
    print(lines[-1], flush=True)
    return lines


def nodelay_table(port: int, repeats: int) -> list[str]:
    fast_ping, slow_ping = PlainPing(port, nodelay=True), PlainPing(port, nodelay=False)
    try:
        fast = measure(partial(fast_ping.round_trip, bytes(KB)), repeats)
        slow = measure(partial(slow_ping.round_trip, bytes(KB)), repeats)
    finally:
        fast_ping.close()
        slow_ping.close()
    lines = [
        "| 1 KB round trip, plain paho | TCP_NODELAY | Nagle (default) | ratio |",
        "|---|---|---|---|",
        f"| p50 | {fast.p50_ms:.2f} ms | {slow.p50_ms:.2f} ms | {slow.p50_ms / fast.p50_ms:.0f}x |",
    ]
    print(lines[-1], flush=True)
    return lines


def run(quick: bool) -> str:
    sizes = (
        [(1 * KB, 30), (1 * MB, 5), (8 * MB, 3)]
        if quick
        else [(1 * KB, 300), (1 * MB, 40), (8 * MB, 12)]
    )
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp)) as broker:
        echo = subprocess.Popen(
            [sys.executable, __file__, "--serve-echo", str(broker.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert echo.stdout is not None
            if echo.stdout.readline().strip() != "ready":
                raise RuntimeError("echo process failed to start")
            plain, ms = PlainPing(broker.port, nodelay=True), MedsplitPing(broker.port)
            try:
                lines = latency_table(plain, ms, sizes)
                lines += ["", *throughput_table(plain, ms, 4 * MB, 4 if quick else 25)]
            finally:
                ms.close()
                plain.close()
            lines += ["", *nodelay_table(broker.port, 20 if quick else 50)]
            lines += ["", *codec_table(10 if quick else 50)]
        finally:
            echo.communicate(timeout=30)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--write-docs", action="store_true", help="write the tables into docs/benchmarks.md"
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--serve-echo", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        serve_echo(args.serve_echo)
        return
    table = run(args.quick)
    print()
    print(table)
    if args.write_docs:
        write_section(
            "transport",
            "## Transport: medsplit vs plain paho through Mosquitto\n\n"
            "Command: `make bench` (runs `python bench/transport.py --write-docs`).\n"
            f"Machine: {machine()}; Mosquitto on loopback, QoS 1; the echo side runs in a second process.\n\n"
            "A medsplit round trip is: encode (safetensors, sha256, finite check), publish chunked at "
            "256 KiB, broker, receive, reassemble, verify, decode, and the same back. The fp16 columns "
            "send float32 tensors down-cast to float16 (half the bytes) and restore float32 on arrival; "
            "plain paho always sends the full fp32 byte count.\n\n"
            f"{table}\n",
        )


if __name__ == "__main__":
    main()
