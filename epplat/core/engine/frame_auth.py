"""Authenticated frames on the internal zmq sockets (API servers <-> engines, the DP wake
channel, driver -> TP workers).

Every frame carries a keyed BLAKE2b tag of its bytes under the deployment's secret
(``--internal-secret`` / ``EPPLAT_INTERNAL_SECRET``; generated per run on a single node).
A frame whose tag does not match, or that does not decode, is dropped and logged (at most
once a second per socket) and the receiver goes on: no peer can crash or steer an engine
or an API server with bytes it made up. The peer that sent it is dropped too (its connection
shut, when the frame was received as a zmq.Frame, which knows it); a peer whose greeting is
not ZMTP's is dropped by zmq itself. Every bound socket is made by `listen`: a ZAP domain on
it makes zmq refuse ZMTP/1.0 and 2.0 peers (which need no handshake, so garbage that looks
like their framing was kept connected, idle, for good; ZMTP 3 peers pass, as no ZAP handler
is bound), and a peer that does not finish its handshake within HANDSHAKE_MS is dropped.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import struct
import time

import msgspec
import zmq

logger = logging.getLogger(__name__)

TAG_BYTES = 16
HANDSHAKE_MS = 5000     # zmq's default is 30 s; our peers are processes of one deployment


def listen(sock: "zmq.Socket", addr: str) -> "zmq.Socket":
    """Bind `sock` to `addr`, refusing peers that speak ZMTP before 3.0 or stall their handshake."""
    sock.setsockopt(zmq.ZAP_DOMAIN, b"epplat")
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    sock.bind(addr)
    return sock


class BadFrame(ValueError):
    """A frame that is not authentic or does not decode."""


class FrameAuth:
    def __init__(self, secret: str):
        if not secret:
            raise ValueError("the internal secret must not be empty")
        self._key = hashlib.sha256(secret.encode()).digest()
        self._dropped: dict[str, list] = {}

    def _tag(self, payload) -> bytes:
        return hashlib.blake2b(payload, key=self._key, digest_size=TAG_BYTES).digest()

    def seal(self, payload: bytes) -> bytes:
        return self._tag(payload) + payload

    def open(self, frame) -> memoryview:
        view = memoryview(frame)
        if len(view) < TAG_BYTES or not hmac.compare_digest(view[:TAG_BYTES], self._tag(view[TAG_BYTES:])):
            raise BadFrame("bad authentication tag (a peer without the deployment's secret?)")
        return view[TAG_BYTES:]

    def decode(self, decoder, frame):
        """The message in an authentic frame; BadFrame for anything else."""
        payload = self.open(frame)
        try:
            return decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise BadFrame(f"undecodable message: {e}") from None

    def dropped(self, where: str, err: Exception, frame=None) -> None:
        """Log a dropped frame (a flood is summarized once a second) and drop the peer that sent `frame`."""
        peer = _drop_sender(frame) if isinstance(frame, zmq.Frame) else None
        now = time.monotonic()
        last, count = self._dropped.get(where, (0.0, 0))
        count += 1
        if now - last >= 1.0:
            logger.warning("dropped %d frame(s) on %s%s: %s", count, where, f" (and the peer {peer})" if peer else "",
                           err)
            last, count = now, 0
        self._dropped[where] = [last, count]


def _drop_sender(frame: "zmq.Frame") -> str:
    """Shut the connection `frame` came on (zmq then forgets that peer); its address, for the log.

    zmq.SRCFD is the descriptor the frame was read from, which zmq closes once that peer is gone
    and the kernel may then give to the next connection: frames of a peer already dropped, still
    queued, would name a stranger's. So the descriptor is shut only while its peer is still the
    frame's sender ("Peer-Address": the IP, or for IPC localhost:uid:gid:pid)."""
    try:
        fd, sender = frame.get(zmq.SRCFD), frame.get("Peer-Address")
        with socket.socket(fileno=os.dup(fd)) as s:
            if _peer_address(s) != sender:
                return ""
            s.shutdown(socket.SHUT_RDWR)
    except (zmq.ZMQError, OSError):
        return ""
    if sender.startswith("localhost:"):
        return f"process {sender.rsplit(':', 1)[1]} on a local socket"
    return sender


def _peer_address(s: socket.socket) -> str:
    """The peer of `s` as zmq's Peer-Address writes it."""
    if s.family == socket.AF_UNIX:
        pid, uid, gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return f"localhost:{uid}:{gid}:{pid}"
    return s.getpeername()[0]
