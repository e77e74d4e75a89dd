"""A small request/response channel over TCP for KV connectors (handshakes, leases, "finished
reading" notices): each message is a 4-byte big-endian length and a msgpack map sealed with the
deployment's secret (the engine's BLAKE2b frame auth, ``--internal-secret``), so a prefill and a
decode server talk only when they were given the same secret. No pickle crosses it; a peer
without the secret gets one refusal and the channel goes on."""

from __future__ import annotations

import logging
import socket
import struct
import threading
from typing import Callable

import msgspec

from epplat.core.engine.frame_auth import TAG_BYTES, BadFrame, FrameAuth

logger = logging.getLogger(__name__)

_MAX = 64 << 20
UNAUTHENTICATED = "not authenticated: the prefill and decode servers need the same --internal-secret " \
                  "(EPPLAT_INTERNAL_SECRET)"


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("side channel closed")
        buf += part
    return bytes(buf)


def _recv(sock: socket.socket) -> bytes:
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > _MAX:
        raise ConnectionError(f"side channel message of {n} bytes")
    return _recv_exact(sock, n)


def _decode(auth: FrameAuth, frame: bytes):
    msg = auth.decode(msgspec.msgpack.Decoder(), frame)
    if not isinstance(msg, dict):
        raise BadFrame("not a map")
    return msg


def request(host: str, port: int, msg: dict, auth: FrameAuth, timeout: float = 10.0) -> dict:
    """Send one message and return the answer (ConnectionError / OSError when the peer is not there,
    PermissionError when either side lacks the other's secret)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        _send(sock, auth.seal(msgspec.msgpack.encode(msg)))
        try:
            return _decode(auth, _recv(sock))
        except BadFrame:
            raise PermissionError(f"side channel {host}:{port}: {UNAUTHENTICATED}") from None


class SideChannelServer:
    """Answers each connection's one authentic message with handler(message) in a daemon thread."""

    def __init__(self, host: str, port: int, handler: Callable[[dict], dict], auth: FrameAuth):
        self.handler, self.auth = handler, auth
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
            threading.Thread(target=self._answer, args=(conn,), name="kv-side-channel-peer", daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(10.0)
                try:
                    msg = _decode(self.auth, _recv(conn))
                except BadFrame as e:
                    self.auth.dropped("the KV side channel", e)
                    _send(conn, bytes(TAG_BYTES) + msgspec.msgpack.encode({"error": UNAUTHENTICATED}))
                    return
                _send(conn, self.auth.seal(msgspec.msgpack.encode(self.handler(msg))))
            except Exception as e:      # a bad peer must not end the channel
                logger.warning("KV side channel: %s", e)

    def close(self) -> None:
        self.sock.close()
