"""Round-trip latency and throughput through a real Mosquitto: medsplit's transport vs plain paho.

    python bench/transport.py [--write-docs] [--quick]

A Mosquitto is started on a free loopback port. The echo side runs in a child process (as the
aggregator would, on another machine), the measuring side here. The baseline is a bare
paho-mqtt client (MQTT 5, QoS 1, TCP_NODELAY) sending raw bytes; medsplit sends the same
number of tensor bytes as envelopes through ``Endpoint`` (safetensors layout, xxh3-128 digest,
chunking at the 256 KiB default, header and finite-value checks, de-duplication). This file imports paho only to
build that baseline. Both sides wait passively between OpenMP regions, as the ``medsplit``
command's processes do (medsplit/entry.py): spinning threads would steal the cores paho needs.

Tables: round trips against plain paho sending one frame and sending the same 256 KiB frames
medsplit sends; one-way throughput against plain paho with the same frames; the round trip at
other frame sizes; and the codec alone, per MB, with the allocator tuned (as every medsplit
process runs) and untuned (in a child process with ``MEDSPLIT_MALLOC_TUNING=off``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as medsplit/entry.py

import argparse
import dataclasses
import json
import queue
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
from medsplit.brokers.mosquitto import Mosquitto, free_port
from medsplit.channel import Endpoint
from medsplit.transport import MqttSettings, MqttTransport, TlsSettings
from medsplit.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    Decoder,
    Envelope,
    WireDtype,
    WireLimits,
    encode,
    new_message_id,
)

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


def serve_echo(port: int, tls_dir: Path | None = None) -> None:
    """Echo pings back as pongs and acknowledge stream messages, until stdin closes.

    Plain paho answers each frame from its callback; medsplit answers each whole envelope with
    the same tensors, in the frame size the ping asked for (``meta["frame_bytes"]``). With
    ``tls_dir`` (ca.pem, cert.pem, key.pem) only medsplit answers, over mutual TLS."""
    for tag, nodelay in () if tls_dir else (("nodelay", True), ("nagle", False)):
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

    if not tls_dir:
        _serve_from_a_worker(port)
        _serve_raw_frames(port)
    transport = MqttTransport(
        MqttSettings(port=port, client_id="echo-medsplit", tls=kit_tls(tls_dir))
    )
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
            limits = WireLimits(max_frame_bytes=int(env.meta.get("frame_bytes") or 256 * KB))
            reply = Envelope(env.job, env.site, env.kind, tensors=env.tensors)
            endpoint.limits = limits
            endpoint.send("bench/ms/pong", reply, wire_dtype=wire_dtype)

    threading.Thread(target=loop, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()


def _serve_from_a_worker(port: int) -> None:
    """Plain paho echoing each frame from a thread of its own, not from paho's callback: the
    hand-offs of a receiver that computes its answer outside the network thread, as medsplit's
    aggregator and agents do (a trunk step in paho's thread would stall its keepalives)."""
    client = plain_client(port, "echo-worker", nodelay=True)
    pending: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    client.message_callback_add("bench/worker/ping", lambda c, u, m: pending.put(m.payload))
    subscribe_plain(client, "bench/worker/ping")

    def answer() -> None:
        while True:
            client.publish("bench/worker/pong", pending.get(), qos=1).wait_for_publish(TIMEOUT)

    threading.Thread(target=answer, daemon=True).start()


def _serve_raw_frames(port: int) -> None:
    """medsplit's transport without the envelope: each frame's bytes back from the receiving
    thread, as ``MqttTransport`` hands them over (the transport's share of a round trip)."""
    transport = MqttTransport(MqttSettings(port=port, client_id="echo-raw"))
    transport.connect()
    transport.subscribe("bench/raw/ping")

    def answer() -> None:
        while True:
            inbound = transport.receive(timeout=1.0)
            if inbound is not None:
                transport.publish("bench/raw/pong", inbound.payload)

    threading.Thread(target=answer, daemon=True).start()


class RawPing:
    """Frames through ``MqttTransport`` and back, no envelope: the transport alone."""

    def __init__(self, port: int) -> None:
        self.transport = MqttTransport(MqttSettings(port=port, client_id="ping-raw"))
        self.transport.connect()
        self.transport.subscribe("bench/raw/pong")

    def round_trip(self, frames: list[bytes]) -> None:
        self.transport.publish_all("bench/raw/ping", frames)
        for _ in frames:
            if self.transport.receive(timeout=TIMEOUT) is None:
                raise TimeoutError("no pong")

    def close(self) -> None:
        self.transport.close()


# -- the measuring side -----------------------------------------------------------------------------


def frames_of(size: int, frame: int = DEFAULT_MAX_FRAME_BYTES) -> list[bytes]:
    """``size`` raw bytes cut as medsplit cuts them: the baseline with the same framing."""
    return [bytes(min(frame, size - at)) for at in range(0, max(size, 1), frame)]


class PlainPing:
    def __init__(self, port: int, nodelay: bool, *, worker: bool = False) -> None:
        self.base = "bench/worker" if worker else "bench/nodelay" if nodelay else "bench/nagle"
        self.client = plain_client(port, f"ping-{self.base[6:]}", nodelay)
        self.pongs = threading.Semaphore(0)
        self.acks = threading.Semaphore(0)
        self.client.message_callback_add(f"{self.base}/pong", lambda *a: self.pongs.release())
        self.client.message_callback_add(f"{self.base}/ack", lambda *a: self.acks.release())
        subscribe_plain(self.client, f"{self.base}/pong")
        subscribe_plain(self.client, f"{self.base}/ack")

    def round_trip(self, frames: list[bytes]) -> None:
        """Every frame there and back (the echo answers each one)."""
        infos = [self.client.publish(f"{self.base}/ping", f, qos=1) for f in frames]
        for info in infos:
            info.wait_for_publish(TIMEOUT)
        for _ in frames:
            if not self.pongs.acquire(timeout=TIMEOUT):
                raise TimeoutError("no pong")

    def stream(self, frames: list[bytes], count: int) -> None:
        """``count`` messages of ``frames`` one way; the echo acknowledges each frame."""
        infos = [
            self.client.publish(f"{self.base}/stream", f, qos=1)
            for _ in range(count)
            for f in frames
        ]
        for info in infos:
            info.wait_for_publish(TIMEOUT)
        for _ in infos:
            if not self.acks.acquire(timeout=TIMEOUT):
                raise TimeoutError("stream stalled")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def kit_tls(folder: Path | None) -> TlsSettings | None:
    if folder is None:
        return None
    return TlsSettings(
        ca_file=folder / "ca.pem", cert_file=folder / "cert.pem", key_file=folder / "key.pem"
    )


class MedsplitPing:
    def __init__(self, port: int, tls_dir: Path | None = None) -> None:
        self.transport = MqttTransport(
            MqttSettings(port=port, client_id="ping-medsplit", tls=kit_tls(tls_dir))
        )
        self.transport.connect()
        self.transport.subscribe("bench/ms/pong")
        self.transport.subscribe("bench/ms/ack")
        self.endpoint = Endpoint(self.transport)
        self.wire_dtype: WireDtype = "float32"

    def frame_bytes(self, size: int) -> None:
        self.endpoint.limits = WireLimits(max_frame_bytes=size)

    def _fresh(self, envelope: Envelope) -> Envelope:
        # A new message id each time: the receiver would drop a repeated one as a duplicate.
        meta = {"wire_dtype": self.wire_dtype, "frame_bytes": self.endpoint.limits.max_frame_bytes}
        return dataclasses.replace(envelope, msg_id=new_message_id(), meta=meta)

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


def latency_table(
    plain: PlainPing,
    worker: PlainPing,
    raw: RawPing,
    ms: MedsplitPing,
    sizes: list[tuple[int, int]],
) -> list[str]:
    lines = [
        "| round trip | plain paho, one frame | plain paho, 256 KiB frames | plain paho, same "
        "frames, answered by a worker thread | medsplit's transport, same frames, no envelope "
        "| medsplit fp32 | vs one frame | vs same frames | vs worker-answered "
        "| medsplit fp16 | medsplit int8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, repeats in sizes:
        one = measure(partial(plain.round_trip, [bytes(size)]), repeats)
        framed = measure(partial(plain.round_trip, frames_of(size)), repeats)
        threaded = measure(partial(worker.round_trip, frames_of(size)), repeats)
        transport = measure(partial(raw.round_trip, frames_of(size)), repeats)
        envelope = Envelope("bench", "ping", "x", tensors=tensor_of(size))
        timings = {}
        for dtype in ("float32", "float16", "int8"):
            ms.wire_dtype = dtype  # type: ignore[assignment]
            timings[dtype] = measure(partial(ms.round_trip, envelope), repeats)
        fp32 = timings["float32"].p50_ms
        lines.append(
            f"| {_label(size)} | {one.p50_ms:.2f} ms | {framed.p50_ms:.2f} ms "
            f"| {threaded.p50_ms:.2f} ms | {transport.p50_ms:.2f} ms | {fp32:.2f} ms "
            f"| {fp32 / one.p50_ms:.2f}x | {fp32 / framed.p50_ms:.2f}x | {fp32 / threaded.p50_ms:.2f}x "
            f"| {timings['float16'].p50_ms:.2f} ms | {timings['int8'].p50_ms:.2f} ms |"
        )
        print(lines[-1], flush=True)
    ms.wire_dtype = "float32"
    return lines


def frame_size_table(ms: MedsplitPing, size: int, repeats: int) -> list[str]:
    """The round trip of one message at other frame sizes: why 256 KiB is the default."""
    envelope = Envelope("bench", "ping", "x", tensors=tensor_of(size))
    cells = []
    for frame in (64 * KB, 256 * KB, MB, 4 * MB):
        ms.frame_bytes(frame)
        cells.append(f"{measure(partial(ms.round_trip, envelope), repeats).p50_ms:.2f} ms")
    ms.frame_bytes(DEFAULT_MAX_FRAME_BYTES)
    lines = [
        f"| {_label(size)} fp32 round trip, frames of | 64 KiB | 256 KiB (default) | 1 MiB | 4 MiB |",
        "|---|---|---|---|---|",
        f"| p50 | {' | '.join(cells)} |",
    ]
    print(lines[-1], flush=True)
    return lines


def throughput_table(plain: PlainPing, ms: MedsplitPing, size: int, count: int) -> list[str]:
    total_mb = size * count / MB
    seconds = {
        "plain": measure(partial(plain.stream, frames_of(size), count), 3, warmup=1).p50_ms / 1000
    }
    envelope = Envelope("bench", "ping", "x", tensors=tensor_of(size))
    for dtype in ("float32", "float16"):
        ms.wire_dtype = dtype  # type: ignore[assignment]
        seconds[dtype] = measure(partial(ms.stream, envelope, count), 3, warmup=1).p50_ms / 1000
    ms.wire_dtype = "float32"
    rate = {k: total_mb / v for k, v in seconds.items()}
    lines = [
        f"| {count} x {_label(size)}, one way, 256 KiB frames | plain paho | medsplit fp32 | medsplit fp16 |",
        "|---|---|---|---|",
        f"| tensor MB/s | {rate['plain']:.0f} | {rate['float32']:.0f} ({rate['float32'] / rate['plain']:.2f}x of plain) "
        f"| {rate['float16']:.0f} ({rate['float16'] / rate['plain']:.2f}x of plain) |",
    ]
    print(lines[-1], flush=True)
    return lines


CODEC_CASES = [(KB, "float32"), (16 * KB, "float32"), (MB, "float32"), (4 * MB, "float32"),
               (4 * MB, "float16"), (4 * MB, "int8")]  # fmt: skip


def codec_timings(repeats: int) -> list[tuple[float, float]]:
    """Encode and decode alone, in this process, no network: (encode, decode) p50 ms per case."""
    out = []
    for size, dtype in CODEC_CASES:
        envelope = Envelope("bench", "ping", "x", tensors=tensor_of(size))
        frames = encode(envelope, wire_dtype=dtype)  # type: ignore[arg-type]

        def decode_all(frames: list[bytes] = frames) -> None:
            decoder = Decoder()
            for frame in frames:
                decoder.feed(frame)

        enc = measure(partial(encode, envelope, wire_dtype=dtype), repeats)  # type: ignore[arg-type]
        out.append((enc.p50_ms, measure(decode_all, repeats).p50_ms))
    return out


def codec_table(repeats: int) -> list[str]:
    tuned = codec_timings(repeats)
    child = subprocess.run(
        [sys.executable, __file__, "--codec-only", str(repeats)],
        env={**os.environ, "MEDSPLIT_MALLOC_TUNING": "off"},
        capture_output=True,
        text=True,
        check=True,
    )
    untuned = json.loads(child.stdout)
    lines = [
        "| codec only | encode | decode | per MB, encode + decode | allocator untuned, per MB |",
        "|---|---|---|---|---|",
    ]
    for (size, dtype), (enc, dec), (enc0, dec0) in zip(CODEC_CASES, tuned, untuned, strict=True):
        per_mb = f"{(enc + dec) / (size / MB):.2f} ms"
        before = f"{(enc0 + dec0) / (size / MB):.2f} ms"
        lines.append(
            f"| {_label(size)} {dtype} | {enc:.3f} ms | {dec:.3f} ms | {per_mb} | {before} |"
        )
    print(lines[-1], flush=True)
    return lines


def nodelay_table(port: int, repeats: int) -> list[str]:
    fast_ping, slow_ping = PlainPing(port, nodelay=True), PlainPing(port, nodelay=False)
    try:
        fast = measure(partial(fast_ping.round_trip, [bytes(KB)]), repeats)
        slow = measure(partial(slow_ping.round_trip, [bytes(KB)]), repeats)
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


def aes_gcm_mb_per_s(size: int = 2 * MB, repeats: int = 20) -> float:
    """This machine's AES-128-GCM throughput on one core (what TLS 1.2/1.3 uses here)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    cipher, data = AESGCM(AESGCM.generate_key(bit_length=128)), os.urandom(size)
    started = time.perf_counter()
    for i in range(repeats):
        sealed = cipher.encrypt(i.to_bytes(12, "big"), data, None)
        cipher.decrypt(i.to_bytes(12, "big"), sealed, None)
    return 2 * repeats * size / MB / (time.perf_counter() - started)


def tls_table(workdir: Path, size: int, repeats: int) -> list[str]:
    """The same medsplit round trip in plaintext and over mutual TLS, and TLS's floor: every
    byte is encrypted and decrypted twice each way (client to broker, broker to client)."""
    from medsplit.security.provision import Federation, Provisioner  # noqa: PLC0415

    kits = workdir / "pki"
    Provisioner.create(
        Federation(job_id="bench", sites=["ping", "echo"], broker_hosts=["127.0.0.1"]), kits
    )
    server = kits / "mosquitto"
    tls_port = free_port()
    listener = (
        f"listener {tls_port} 127.0.0.1\ncafile {server / 'ca.pem'}\n"
        f"certfile {server / 'server.pem'}\nkeyfile {server / 'server.key'}\n"
        "require_certificate true\ntls_version tlsv1.2\nset_tcp_nodelay true\n"
    )
    envelope = Envelope("j", "s", "k", tensors=tensor_of(size))
    timings = {}
    with Mosquitto(workdir / "broker", extra_config=listener) as broker:
        for name, port, kit in (("plaintext", broker.port, None), ("mutual TLS", tls_port, kits)):
            command = [sys.executable, __file__, "--serve-echo", str(port)]
            if kit is not None:
                command += ["--tls-dir", str(kit / "echo")]
            echo = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            try:
                assert echo.stdout is not None
                if echo.stdout.readline().strip() != "ready":
                    raise RuntimeError("echo process failed to start")
                ping = MedsplitPing(port, None if kit is None else kit / "ping")
                try:
                    timings[name] = measure(partial(ping.round_trip, envelope), repeats)
                finally:
                    ping.close()
            finally:
                echo.communicate(timeout=30)
    aes = aes_gcm_mb_per_s()
    crossing = 2 * 2 * 2 * size / MB  # two directions, two hops each, encrypt + decrypt
    floor_ms = crossing / aes * 1e3
    extra = timings["mutual TLS"].p50_ms - timings["plaintext"].p50_ms
    lines = [
        f"| {_label(size)} medsplit round trip | plaintext | mutual TLS | TLS adds | "
        "AES-128-GCM on one core | TLS's floor (core-ms) |",
        "|---|---|---|---|---|---|",
        f"| p50 | {timings['plaintext'].p50_ms:.2f} ms | {timings['mutual TLS'].p50_ms:.2f} ms | "
        f"{extra:.2f} ms | {aes:.0f} MB/s | {floor_ms:.2f} ms |",
    ]
    print(lines[-1], flush=True)
    return lines


def run(quick: bool) -> str:
    sizes = [(KB, 30), (16 * KB, 30), (2 * MB, 5), (8 * MB, 3)]
    if not quick:
        sizes = [(KB, 300), (16 * KB, 300), (2 * MB, 40), (8 * MB, 12)]
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
            worker = PlainPing(broker.port, nodelay=True, worker=True)
            raw = RawPing(broker.port)
            try:
                lines = latency_table(plain, worker, raw, ms, sizes)
                lines += ["", *throughput_table(plain, ms, 4 * MB, 4 if quick else 25)]
                lines += ["", *frame_size_table(ms, 2 * MB, 5 if quick else 30)]
            finally:
                ms.close()
                plain.close()
                worker.close()
                raw.close()
            lines += ["", *nodelay_table(broker.port, 20 if quick else 50)]
            lines += ["", *codec_table(10 if quick else 50)]
        finally:
            echo.communicate(timeout=30)
        lines += ["", *tls_table(Path(tmp), 2 * MB, 5 if quick else 40)]
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
    parser.add_argument("--tls-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--codec-only", type=int, metavar="REPEATS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        serve_echo(args.serve_echo, args.tls_dir)
        return
    if args.codec_only:
        print(json.dumps(codec_timings(args.codec_only)))
        return
    table = run(args.quick)
    print()
    print(table)
    if args.write_docs:
        write_section(
            "transport",
            "## Transport: medsplit vs plain paho through Mosquitto\n\n"
            "Command: `make bench` (runs `python bench/transport.py --write-docs`).\n"
            f"Machine: {machine()}; Mosquitto on loopback, QoS 1; the echo side runs in a second "
            "process; both wait passively between OpenMP regions, as medsplit's processes do.\n\n"
            "A medsplit round trip is: encode (safetensors layout, xxh3-128, finite check), "
            "publish chunked at 256 KiB, broker, receive, reassemble, verify, decode, and the same "
            "back. The fp16 and int8 columns send float32 tensors as float16 or as int8 with a "
            "scale per row (half or a quarter of the bytes) and restore float32 on arrival; plain "
            "paho always sends the full fp32 byte count, either as one frame or cut into the "
            "frames medsplit sends.\n\n"
            f"{table}\n",
        )


if __name__ == "__main__":
    main()
