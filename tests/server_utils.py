"""Starts a real `epplat serve` subprocess on a free port and waits until it is healthy."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx


# every server and headless node a test starts belongs to one deployment: multi-node layouts
# need the same internal secret on each node (a single node generates its own when this is "")
DEPLOYMENT = {"EPPLAT_INTERNAL_SECRET": "epplat-tests"}


# ports handed out by this test process: a port is given once, so two servers started by one
# test (or a port a server derives from its base, e.g. a side channel's base + DP rank) never meet
_HANDED_OUT: set[int] = set()
# below the kernel's ephemeral range (32768-60999 by default): an outgoing connection of some other
# process cannot take a port between the moment it is picked here and the moment a server binds it
_LOW, _HIGH = 20000, 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_ports(offsets=(0,)) -> int:
    """A base port P with P + each offset free (on every interface), outside the ephemeral range."""
    rng = random.Random()
    for _ in range(2000):
        base = rng.randrange(_LOW, _HIGH - max(offsets))
        ports = [base + off for off in offsets]
        if not _HANDED_OUT.intersection(ports) and all(_bindable(p) for p in ports):
            _HANDED_OUT.update(ports)
            return base
    raise RuntimeError("no free port range")


def free_port(count: int = 1) -> int:
    """A base port P with P .. P + count - 1 free (a server that adds its DP rank to P needs count = DP)."""
    return free_ports(tuple(range(count)))


def rpc_port() -> int:
    """A base port for --data-parallel-rpc-port with the ports epplat derives from it (+1, +2, +10..+13) free."""
    return free_ports((0, 1, 2, 10, 11, 12, 13))


def _tcp_address(hexed: str) -> tuple[str, int]:
    """/proc/net/tcp{,6}'s ADDR:PORT in hex (each 32-bit word of the address in host order, little-endian
    here) as (address, port); an IPv4-mapped IPv6 address (::ffff:a.b.c.d, a dual-stack socket's) as a.b.c.d."""
    addr, port = hexed.split(":")
    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))
    if len(raw) == 16 and raw[:12] == b"\0" * 10 + b"\xff\xff":
        raw = raw[12:]
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw), int(port, 16)


def tcp_sockets(pid: int, state: str = "01") -> set[tuple[tuple[str, int], tuple[str, int]]]:
    """(local, remote) (address, port) pairs of the TCP sockets process `pid` holds in `state` (01: established,
    0A: listening), from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = set()
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        with open(table) as f:
            for row in (line.split() for line in f.readlines()[1:]):
                if row[9] in inodes and row[3] == state:
                    out.add((_tcp_address(row[1]), _tcp_address(row[2])))
    return out


def group_pids(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group (a Server's, as it starts a new session)."""
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(p))
    return pids


def start_headless(model: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`epplat serve MODEL --headless ARGS...`: a second node's engines, in their own process group
    (end it with ``kill_headless`` if the primary's shutdown did not)."""
    return subprocess.Popen([sys.executable, "-m", "epplat.cli", "serve", model, "--headless", *args],
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **DEPLOYMENT, **(env or {})},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_headless(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Server:
    """`epplat serve MODEL ARGS...` as a subprocess; its log is kept for failure messages."""

    def __init__(self, model: str | None, *args: str, env: dict | None = None, timeout: float = 120.0,
                 port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="epplat-serve-", suffix=".log", delete=False)
        if "--num-gpu-blocks-override" not in args and "--kv-cache-memory-bytes" not in args:
            args = (*args, "--kv-cache-memory-bytes", "256M")  # several test servers may share a GPU
        cmd = [sys.executable, "-m", "epplat.cli", "serve", *([model] if model else []),
               "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **DEPLOYMENT, **(env or {})},
                                     start_new_session=True)
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class HealthPoller:
    """GET /health every 50 ms from start() until stop() (``seen``: the status codes, "refused" when the
    server did not answer), so that a 503 window before a server exits is seen."""

    def __init__(self, url: str):
        self.url, self.seen = url, []
        self._on = threading.Event()
        self._thread = threading.Thread(target=self._poll)

    def _poll(self) -> None:
        while self._on.is_set():
            try:
                self.seen.append(httpx.get(self.url + "/health", timeout=5).status_code)
            except httpx.HTTPError:
                self.seen.append("refused")
            time.sleep(0.05)

    def start(self) -> None:
        self._on.set()
        self._thread.start()

    def first_change(self, within: float = 15.0):
        """The first answer other than 200 (waiting up to ``within`` s for one); polling stops."""
        deadline = time.time() + within
        while time.time() < deadline and not set(self.seen) - {200}:
            time.sleep(0.1)
        self._on.clear()
        self._thread.join()
        return next((h for h in self.seen if h != 200), None)
