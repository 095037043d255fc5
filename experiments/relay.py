"""A loopback TCP relay between clients and the broker, whose link a test or ``bench/chaos.py``
can cut (``sever``), stall (``stall``/``resume``: bytes wait, the connections stay up) or take
down (``go_down``/``come_up``: cut, and every new connection refused until it is up again, as a
WAN link that is out).

Only the network path is interrupted; the broker on the other side is the real Mosquitto.
"""

from __future__ import annotations

import socket
import threading
from contextlib import suppress


class TcpProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._accepting: threading.Thread | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._running = True
        self._flowing = threading.Event()
        self._flowing.set()
        self.accepted = 0
        self._listen(self._server)

    def _listen(self, server: socket.socket) -> None:
        self._server = server
        self._accepting = threading.Thread(
            target=self._accept_loop, args=(server,), daemon=True, name="proxy-accept"
        )
        self._accepting.start()

    def _accept_loop(self, server: socket.socket) -> None:
        while self._running:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, upstream]
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with suppress(OSError):
            while data := src.recv(1 << 16):
                self._flowing.wait()
                dst.sendall(data)
        for sock in (src, dst):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def sever(self) -> None:
        """Cut every relayed connection at once, as a network failure would."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def go_down(self) -> None:
        """The link is out: every connection is cut, and new ones are refused (nothing listens
        on the port) until ``come_up``."""
        with suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
        self._server.close()
        if self._accepting is not None:
            self._accepting.join()
        self.sever()

    def come_up(self) -> None:
        self._listen(socket.create_server(("127.0.0.1", self.port)))

    def stall(self) -> None:
        """Hold every byte in flight (a congested or flapping link) until ``resume``."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self.resume()
        self._running = False
        self._server.close()
        self.sever()
