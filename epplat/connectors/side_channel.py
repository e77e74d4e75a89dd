"""A small request/response channel over TCP for KV connectors (handshakes, leases, "finished
reading" notices): each message is a 4-byte big-endian length and a msgpack map sealed with the
deployment's secret (the engine's BLAKE2b frame auth, ``--internal-secret``), so a prefill and a
decode server talk only when they were given the same secret; a server given none (vLLM's PD commands
pasted as they are: one node generates its own secret for its internal sockets) opens its side channel
to any peer, as vLLM's is, and says so once. No pickle crosses it; a peer
without the secret gets one refusal and the channel goes on. The server reads a request of at
most REQUEST_MAX bytes (a longer length prefix is dropped at once, before a byte is kept) within
REQUEST_DEADLINE_S of the connection (a silent or trickling peer is dropped then), each
connection in its own thread, at most MAX_PEERS at a time, so no peer holds up another."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Callable, Optional

import msgspec

from epplat.core.engine.frame_auth import TAG_BYTES, BadFrame, FrameAuth

logger = logging.getLogger(__name__)

_MAX = 64 << 20             # an answer (a handshake's agent metadata may be large)
REQUEST_MAX = 1 << 20       # a request: an op and a few ids
REQUEST_DEADLINE_S = 5.0
MAX_PEERS = 256
OPEN_KEY = "epplat KV side channel without --internal-secret"   # a known key: authenticates nothing
UNAUTHENTICATED = "not authenticated: the prefill and decode servers need the same --internal-secret " \
                  "(EPPLAT_INTERNAL_SECRET)"


_said_open = False      # the open channel's warning is said once a process


def channel_auth(parallel, connector: str) -> FrameAuth:
    """The side channel's frame auth: the deployment's secret when one was given, else the open key."""
    global _said_open
    if not parallel.internal_secret_generated:
        return FrameAuth(parallel.internal_secret)
    if not _said_open:
        _said_open = True
        logger.warning("%s: no --internal-secret (EPPLAT_INTERNAL_SECRET) was given, so its KV side channel "
                       "accepts any peer that reaches its port, as vLLM's does; give the prefill and decode "
                       "servers the same secret to authenticate it", connector)
    return FrameAuth(OPEN_KEY)


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int, deadline: Optional[float]) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionError(f"side channel peer sent {len(buf)} of {n} bytes in {REQUEST_DEADLINE_S:g} s")
            sock.settimeout(left)
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("side channel closed")
        buf += part
    return bytes(buf)


def _recv(sock: socket.socket, limit: int = _MAX, deadline: Optional[float] = None) -> bytes:
    (n,) = struct.unpack(">I", _recv_exact(sock, 4, deadline))
    if n > limit:
        raise ConnectionError(f"side channel message of {n} bytes (at most {limit})")
    return _recv_exact(sock, n, deadline)


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
        self.peers = threading.BoundedSemaphore(MAX_PEERS)
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
            if not self.peers.acquire(blocking=False):
                self.auth.dropped("the KV side channel", ConnectionError(f"{MAX_PEERS} peers at once"))
                conn.close()
                continue
            try:
                threading.Thread(target=self._answer, args=(conn,), name="kv-side-channel-peer", daemon=True).start()
            except RuntimeError as e:     # no thread to be had: this peer goes, the channel stays
                self.peers.release()
                conn.close()
                logger.warning("KV side channel: %s", e)

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                try:
                    msg = _decode(self.auth, _recv(conn, REQUEST_MAX, time.monotonic() + REQUEST_DEADLINE_S))
                except BadFrame as e:
                    self.auth.dropped("the KV side channel", e)
                    _send(conn, bytes(TAG_BYTES) + msgspec.msgpack.encode({"error": UNAUTHENTICATED}))
                    return
                answer = self.auth.seal(msgspec.msgpack.encode(self.handler(msg)))
                conn.settimeout(10.0)
                _send(conn, answer)
            except Exception as e:      # a bad peer must not end the channel
                logger.warning("KV side channel: %s", e)
            finally:
                self.peers.release()

    def close(self) -> None:
        self.sock.close()
