"""Gathers one JSON message from every node at the first node, and sends one answer back.

The first node listens on ``address:port``; every other node connects (retrying until
the deadline, the first node may start later), sends one JSON line, and waits for one
JSON line back. Plain TCP and JSON: nothing is pickled. The first node reads each connection
in its own thread (a peer that connects and says nothing, or trickles, holds up no other node;
it is dropped after PEER_DEADLINE_S), and a line over 16 MiB or one that is not a JSON object
drops its peer.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from typing import Callable

_MAX_LINE = 16 << 20
PEER_DEADLINE_S = 30.0


class RendezvousError(RuntimeError):
    """The nodes could not all meet; one line for the user."""


def _send(sock: socket.socket, msg: dict) -> None:
    sock.sendall(json.dumps(msg).encode() + b"\n")


def _recv(sock: socket.socket, deadline: float) -> dict:
    buf = b""
    while not buf.endswith(b"\n"):
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
        if len(buf) > _MAX_LINE:
            raise ValueError("message too long")
    msg = json.loads(buf)
    if not isinstance(msg, dict):
        raise ValueError("message is not a JSON object")
    return msg


def serve(address: str, port: int, expected: int, timeout: float,
          accept: Callable[[dict], str | None], answer: Callable[[list[dict], bool], dict]) -> dict:
    """First node: collect up to ``expected`` messages before the deadline (``accept(msg)`` returns why
    one is refused, or None), then send ``answer(messages, all_joined)`` to every node and return it."""
    deadline = time.monotonic() + timeout
    try:
        srv = socket.create_server((address, port), reuse_port=False)
    except OSError as e:
        raise RendezvousError(f"cannot listen on {address}:{port} ({e.strerror}); is {address} an address "
                              f"of this node and --master-port free?") from None
    conns, msgs, arrived = [], [], queue.Queue()
    threading.Thread(target=_accept, args=(srv, deadline, arrived), name="rendezvous-accept", daemon=True).start()
    try:
        while len(msgs) < expected:
            try:
                conn, msg = arrived.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            why = accept(msg)
            if why:
                _send(conn, {"error": why})
                conn.close()
                continue
            conns.append(conn)
            msgs.append(msg)
        result = answer(msgs, len(msgs) == expected)
        for c in conns:
            try:
                _send(c, result)
            except OSError:
                pass
        return result
    finally:
        for c in conns:
            c.close()
        srv.close()
        while not arrived.empty():       # read after the last one was taken
            arrived.get()[0].close()


def _accept(srv: socket.socket, deadline: float, arrived: "queue.Queue") -> None:
    """Until the deadline (or the listener closes): each connection's message read in a thread of its own."""
    while time.monotonic() < deadline:
        try:
            srv.settimeout(max(0.1, deadline - time.monotonic()))
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        except OSError:         # closed by gather (its answer given) between two accepts, or while in one
            return
        threading.Thread(target=_read_one, args=(conn, min(deadline, time.monotonic() + PEER_DEADLINE_S), arrived),
                         name="rendezvous-peer", daemon=True).start()


def _read_one(conn: socket.socket, deadline: float, arrived: "queue.Queue") -> None:
    try:
        msg = _recv(conn, deadline)
        conn.settimeout(30.0)       # for the answer
        arrived.put((conn, msg))
    except (OSError, ValueError, ConnectionError):
        conn.close()


def join(address: str, port: int, msg: dict, timeout: float) -> dict:
    """Any other node: send ``msg`` to the first node and return its answer."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=max(0.1, deadline - time.monotonic())) as s:
                _send(s, msg)
                return _recv(s, deadline)
        except (ConnectionRefusedError, socket.timeout) as e:
            last = str(e) or type(e).__name__
        except (OSError, ValueError, ConnectionError) as e:
            last = str(e) or type(e).__name__
        time.sleep(0.2)
    raise RendezvousError(f"the first node {address}:{port} did not answer within {timeout:g} s ({last})")
