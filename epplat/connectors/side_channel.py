"""A small request/response channel over TCP for KV connectors (handshakes, leases): each message
is a 4-byte big-endian length and a msgpack map. No pickle crosses it."""

from __future__ import annotations

import logging
import socket
import struct
import threading
from typing import Callable

import msgspec

logger = logging.getLogger(__name__)

_MAX = 64 << 20


def _send(sock: socket.socket, obj) -> None:
    data = msgspec.msgpack.encode(obj)
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("side channel closed")
        buf += part
    return bytes(buf)


def _recv(sock: socket.socket):
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > _MAX:
        raise ConnectionError(f"side channel message of {n} bytes")
    return msgspec.msgpack.decode(_recv_exact(sock, n))


def request(host: str, port: int, msg: dict, timeout: float = 10.0) -> dict:
    """Send one message and return the answer (ConnectionError / OSError when the peer is not there)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        _send(sock, msg)
        return _recv(sock)


class SideChannelServer:
    """Answers each connection's one message with handler(message) in a daemon thread."""

    def __init__(self, host: str, port: int, handler: Callable[[dict], dict]):
        self.handler = handler
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, name="kv-side-channel", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(10.0)
                    msg = _recv(conn)
                    _send(conn, self.handler(msg) if isinstance(msg, dict) else {"error": "not a map"})
                except Exception as e:      # a bad peer must not end the channel
                    logger.warning("KV side channel: %s", e)

    def close(self) -> None:
        self.sock.close()
