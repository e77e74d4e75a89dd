"""Faults and shutdowns with real processes: a killed launcher leaves no engine behind and a
restart on the same port serves, on one node and on two (the head killed); SIGTERM drains
in-flight streams and exits 0 without leaving the socket folder; frames that are garbage or
sealed with another deployment's secret are dropped on every bound internal socket, with the
peer that sent them, and a raw socket speaking no ZMTP is dropped, each logged once; a node
with another deployment's secret is refused before the world forms; a
stopped (wedged) engine turns /health to 503, ends in-flight requests with an OpenAI-style
503 and makes the server exit non-zero."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import stat
import struct
import threading
import time

import httpx
import msgspec
import pytest
import zmq

from epplat.core.engine import protocol as P
from epplat.core.engine.frame_auth import FrameAuth
from server_utils import Server, free_port, group_pids, tcp_sockets

DP2_EP = ("--dtype", "float32", "-dp", "2", "-ep", "--max-model-len", "256")
GENERATED_SECRET = {"EPPLAT_INTERNAL_SECRET": ""}     # single node: the server makes its own


class Stream(threading.Thread):
    """One streamed completion read in a thread: chunks counted, finish reason and error events kept."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.chunks, self.finish, self.errors, self.failure = 0, None, [], None
        self.started = threading.Event()
        self.start()

    def run(self):
        body = {"prompt": "streams in flight", "max_tokens": self.max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    d = json.loads(line[6:])
                    if "error" in d:
                        self.errors.append(d["error"])
                        continue
                    self.chunks += 1
                    self.finish = d["choices"][0]["finish_reason"] or self.finish
                    self.started.set()
        except httpx.HTTPError as e:
            self.failure = e
        finally:
            self.started.set()


def wait_gone(pgid: int, seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline and group_pids(pgid):
        time.sleep(0.1)
    return group_pids(pgid)


def ipc_dir(server: Server) -> str:
    return re.search(r"internal sockets in (\S+)", server.output()).group(1)


def engine_pid(server: Server, dp_rank: int) -> int:
    return int(re.search(rf"engine \(DP rank {dp_rank}, pid (\d+)\) ready", server.output()).group(1))


def greedy(url: str) -> str:
    r = httpx.post(url + "/v1/completions", json={"prompt": "same tokens", "max_tokens": 8, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_sigkill_leaves_no_engine_a_restart_serves_and_sigterm_drains(qwen3_moe_dir):
    first = Server(str(qwen3_moe_dir), *DP2_EP, env=GENERATED_SECRET)
    try:
        streams = [Stream(first.url, 200) for _ in range(2)]
        assert all(s.started.wait(60) for s in streams) and all(s.chunks for s in streams), first.output()
        os.kill(first.proc.pid, signal.SIGKILL)       # the launcher only, as the OOM killer would
        first.proc.wait(10)
        left = wait_gone(first.proc.pid, 10)
        assert not left, f"processes outlived the killed server by 10 s: {left}"
    finally:
        first.stop()
        if group_pids(first.proc.pid):
            os.killpg(first.proc.pid, signal.SIGKILL)

    with Server(str(qwen3_moe_dir), *DP2_EP, port=first.port, env=GENERATED_SECRET) as again:   # same flags, same port
        streams = [Stream(again.url, 120) for _ in range(2)]
        assert all(s.started.wait(60) for s in streams)
        os.killpg(again.proc.pid, signal.SIGTERM)     # to the whole group, as systemd does
        assert again.proc.wait(60) == 0, again.output()[-3000:]
        for s in streams:
            s.join(30)
            assert (s.finish, s.chunks, s.errors, s.failure) == ("length", 120, [], None), again.output()[-3000:]
        assert not os.path.exists(ipc_dir(again))
        assert not wait_gone(again.proc.pid, 10)


ZMTP_SIGNATURE = b"\xff" + bytes(8) + b"\x7f"      # ZMTP 3's greeting starts so (rfc.zeromq.org/spec/23)


ZMTP_1_0_FRAME = b"\x06\x00hello"                  # ZMTP/1.0: length 6, flags 0, body; no greeting to wait for


def not_dropped_in_time(folder: str) -> list:
    """Raw peers on every socket the server and its engines listen on: one that speaks ZMTP/1.0 (no
    handshake, so zmq kept it, idle, for good), one that sends a ZMTP 3 signature and stops, and
    one that sends nothing. Each must be dropped, the first within 2 s, the others within the
    handshake limit (frame_auth.HANDSHAKE_MS, 5 s; zmq's default was 30 s): those that were not."""
    limits = {"ZMTP/1.0": 2, "stalled ZMTP 3": 5 + 3, "silent": 5 + 3}
    up = []
    for name in sorted(os.listdir(folder)):
        if stat.S_ISSOCK(os.stat(os.path.join(folder, name)).st_mode):
            for kind, greeting in zip(limits, (ZMTP_1_0_FRAME, ZMTP_SIGNATURE, b"")):
                raw = socket.socket(socket.AF_UNIX)
                raw.connect(os.path.join(folder, name))
                raw.sendall(greeting)
                raw.setblocking(False)
                up.append((name, kind, raw))
    assert {name for name, _, _ in up} >= {"api0-in", "api0-out", "wake-in", "wake-out"}, up
    t0, late = time.monotonic(), []
    while up and time.monotonic() - t0 < max(limits.values()):
        for peer in list(up):
            try:
                while peer[2].recv(4096):       # zmq's greeting, then the end
                    pass
            except BlockingIOError:
                continue
            except ConnectionResetError:
                pass
            up.remove(peer)
            peer[2].close()
            if time.monotonic() - t0 > limits[peer[1]]:
                late.append(peer[:2])
        time.sleep(0.05)
    for peer in up:
        peer[2].close()
    return sorted(late + [peer[:2] for peer in up])


def _logged(server, text: str, wait_s: float = 10.0) -> list[str]:
    """The server's log lines holding `text`, waiting up to wait_s for the first (a loaded machine can
    hold the writing process back after the drop the test saw)."""
    deadline = time.monotonic() + wait_s
    while True:
        lines = [ln for ln in server.output().splitlines() if text in ln]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def test_bad_frames_are_dropped_and_a_stopped_engine_ends_the_server(qwen3_moe_dir):
    s = Server(str(qwen3_moe_dir), *DP2_EP, env={"EPPLAT_ENGINE_ITERATION_TIMEOUT_S": "3", **GENERATED_SECRET})
    try:
        before = greedy(s.url)
        folder, ctx = ipc_dir(s), zmq.Context()
        stranger = FrameAuth("another deployment's secret")
        fake_output = P.encoder.encode(P.EngineOutputs(0, [P.EngineOutput("cmpl-x-0", [1], finish_reason="stop")]))
        fake_ready = P.encoder.encode(P.EngineReady(0, 4, 4, 4))
        fake_wake = P.encoder.encode(P.Wake(7, 0))
        names = {"api0-out": "the API server's output socket", "api0-in": "the API server's request socket",
                 "wake-in": "the wake channel"}
        for kind, name, msg in ((zmq.PUSH, "api0-out", fake_output), (zmq.DEALER, "api0-in", fake_ready),
                                (zmq.PUSH, "wake-in", fake_wake)):
            sock = ctx.socket(kind)
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            sock.setsockopt(zmq.RECONNECT_IVL, -1)     # once dropped, no reconnect delivering the rest later
            sock.connect(f"ipc://{folder}/{name}")
            for frame in (b"", b"\xc1garbage", msg, stranger.seal(msg), stranger.seal(b"\x93\x01")):
                sock.send(frame)
            dropped = monitor.poll(5000)
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            assert dropped, f"a peer sending bad frames to {name} was not dropped"
            raw = socket.socket(socket.AF_UNIX)        # a peer whose ZMTP greeting names no mechanism zmq knows
            raw.settimeout(5)
            raw.connect(f"{folder}/{name}")
            try:
                raw.sendall(ZMTP_SIGNATURE + b"\x03\x00" + b"GARBAGE".ljust(20, b"\x00") + bytes(32) + os.urandom(64))
                while raw.recv(4096):                  # zmq's greeting, then the end: dropped
                    pass
            except (ConnectionResetError, BrokenPipeError):
                pass                                   # dropped before it read (or answered) everything
            raw.close()
        ctx.term()          # every socket closed: returns at once (a context left to the GC can hang it in term)
        assert not_dropped_in_time(folder) == []
        time.sleep(1.5)
        assert greedy(s.url) == before            # still serving, the same tokens
        for name, where in names.items():
            lines = _logged(s, f"frame(s) on {where}")
            assert len(lines) == 1, (name, lines, _logged(s, "dropped"), s.output()[-3000:])  # a burst logged once
            assert "(and the peer " in lines[0], lines      # its connection found (zmq.SRCFD) and shut
        assert httpx.get(s.url + "/health").status_code == 200

        stream = Stream(s.url, 200)
        assert stream.started.wait(60) and stream.chunks
        t0 = time.time()
        os.kill(engine_pid(s, 1), signal.SIGSTOP)   # as a wedged kernel would
        codes = []
        while time.time() - t0 < 20:
            try:
                codes.append(httpx.get(s.url + "/health", timeout=1).status_code)
            except httpx.HTTPError:
                codes.append(None)
            if codes[-1] != 200:
                break
            time.sleep(0.1)
        assert codes[-1] == 503, codes[-5:]
        assert time.time() - t0 < 3 + 3
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == 503
        stream.join(10)
        assert stream.finish is None and len(stream.errors) == 1, (stream.errors, stream.failure)
        err = stream.errors[0]
        assert err["code"] == 503 and "DP rank" not in err["message"] and "heartbeat" not in err["message"]
        assert s.proc.wait(20) != 0
        assert not wait_gone(s.proc.pid, 10)
        assert "sent nothing (not even a heartbeat) for 3 s" in s.output()
    finally:
        s.stop()
        if group_pids(s.proc.pid):
            os.killpg(s.proc.pid, signal.SIGKILL)


def _rank(rank: int, port: int, address: str, results) -> None:
    import torch
    import torch.distributed as dist

    from epplat.config import ParallelConfig
    from epplat.core.distributed.parallel_state import init_parallel
    par = ParallelConfig(data_parallel_size=2, data_parallel_rpc_port=port, data_parallel_address=address,
                         distributed_timeout_seconds=3, enable_expert_parallel=True, internal_secret="s")
    ps = init_parallel(par, rank, "gloo")
    gathered = [torch.zeros(1) for _ in range(2)]
    dist.all_gather(gathered, torch.ones(1), group=ps.dp_group)
    results.put((f"listeners of rank {rank}", tcp_listeners(os.getpid())))
    if rank == 1:
        results.close()
        results.join_thread()                         # sent before it stops
        os.kill(os.getpid(), signal.SIGSTOP)          # a wedged peer
    t0 = time.time()
    try:
        dist.all_gather(gathered, torch.ones(1), group=ps.dp_group)
        results.put(("returned", time.time() - t0))
    except RuntimeError:
        results.put(("timed out", time.time() - t0))


def tcp_listeners(pid: int) -> dict[int, str]:
    """{port: local address} of the TCP sockets process `pid` listens on."""
    return {port: addr for (addr, port), _ in tcp_sockets(pid, "0A")}


def host_address() -> str:
    """This host's address on its default route (the loopback where it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))      # no packet is sent: only the route is looked up
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class RawPeer(threading.Thread):
    """A raw TCP peer that sends `data` (one byte per 0.5 s when trickling) and notes when it is dropped."""

    def __init__(self, port: int, data: bytes, trickle: bool = False):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.data, self.trickle, self.t0, self.dropped_after = data, trickle, time.monotonic(), None
        self.start()

    def run(self):
        try:
            if self.trickle:
                for i in range(len(self.data)):
                    self.sock.sendall(self.data[i:i + 1])      # raises once the connection is gone
                    time.sleep(0.5)
                    if select.select([self.sock], [], [], 0)[0] and not self.sock.recv(4096):
                        break
            else:
                self.sock.sendall(self.data)
                self.sock.settimeout(30)
                while self.sock.recv(4096):
                    pass
        except (OSError, ValueError):      # ValueError: closed by the test
            pass
        self.dropped_after = time.monotonic() - self.t0


def test_tcp_listeners_drop_garbage_half_open_and_oversized_peers_without_costing_others():
    """The KV side channel drops a garbage peer and an oversized length prefix at once, and a silent or
    trickling peer at its deadline (side_channel.REQUEST_DEADLINE_S, 5 s), answering a real request
    meanwhile. The multi-node rendezvous of `epplat ranktable` lets a real node join while such peers
    are connected (it read them one at a time, 30 s each). The TCPStore (torch's server, on the
    listener epplat binds) keeps such peers open but answers the world's ranks meanwhile: checked,
    not changed."""
    from datetime import timedelta

    import torch.distributed as dist

    from epplat.config import ParallelConfig
    from epplat.connectors import side_channel
    from epplat.core.distributed.parallel_state import _tcp_store
    from epplat.platforms.ascend import rendezvous

    meet_port, met = free_port(), []
    meeting = threading.Thread(target=lambda: met.append(rendezvous.serve(
        "127.0.0.1", meet_port, 1, 20, lambda msg: None, lambda msgs, all_joined: {"nodes": msgs})), daemon=True)
    meeting.start()
    time.sleep(0.5)
    auth = FrameAuth("kv secret")
    channel = side_channel.SideChannelServer("127.0.0.1", free_port(), lambda msg: {"echo": msg["op"]}, auth)
    store_port = free_port()
    store = _tcp_store(ParallelConfig(data_parallel_address="127.0.0.1", data_parallel_rpc_port=store_port),
                       0, 2, timedelta(seconds=30))
    try:
        garbage = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(64)
        oversized = struct.pack(">I", 32 << 20) + b"x" * 1000           # 32 MiB announced
        peers = {(where, kind): RawPeer(port, data, kind == "trickling")
                 for where, port in (("side channel", channel.port), ("store", store_port), ("rendezvous", meet_port))
                 for kind, data in (("garbage", garbage), ("oversized", oversized), ("silent", b""),
                                    ("trickling", struct.pack(">I", 100) + b"y" * 100))}
        time.sleep(0.5)
        t = time.monotonic()
        assert rendezvous.join("127.0.0.1", meet_port, {"node": 1}, 10) == {"nodes": [{"node": 1}]}
        assert time.monotonic() - t < 3
        meeting.join(5)
        assert met == [{"nodes": [{"node": 1}]}]
        rank1 = dist.TCPStore("127.0.0.1", store_port, 2, False, timedelta(seconds=10))
        t0, answers = time.monotonic(), []
        while time.monotonic() - t0 < side_channel.REQUEST_DEADLINE_S + 2:
            t = time.monotonic()
            assert side_channel.request("127.0.0.1", channel.port, {"op": "ping"}, auth, timeout=5) == {"echo": "ping"}
            rank1.set("k", str(t))
            assert store.get("k") == str(t).encode()
            answers.append(time.monotonic() - t)
            time.sleep(0.2)
        assert max(answers) < 1.0, answers
        dropped = {key: p.dropped_after for key, p in peers.items()}
        limits = {"garbage": 1.0, "oversized": 1.0, "silent": side_channel.REQUEST_DEADLINE_S + 1.5,
                  "trickling": side_channel.REQUEST_DEADLINE_S + 1.5}
        late = {key: after for key, after in dropped.items()
                if key[0] == "side channel" and (after is None or after > limits[key[1]])}
        assert not late, dropped
    finally:
        channel.close()
        for p in peers.values():
            p.sock.close()


def test_a_stale_frame_does_not_drop_the_peer_that_took_its_descriptor_over(tmp_path):
    """A frame still queued from a peer that is gone names (zmq.SRCFD) a descriptor the kernel may have
    given to the next connection: dropping its sender must not shut that one (another process's)."""
    import subprocess
    import sys

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"ipc://{tmp_path}/r")
    code = ("import sys, time, zmq; s = zmq.Context().socket(zmq.DEALER); s.setsockopt(zmq.RECONNECT_IVL, -1); "
            "s.connect(sys.argv[1]); [(s.send(b'%d' % i), time.sleep(0.2)) for i in range(int(sys.argv[2]))]")
    subprocess.run([sys.executable, "-c", code, f"ipc://{tmp_path}/r", "1"], check=True, timeout=60)
    stale = router.recv_multipart(copy=False)[-1]
    fd = stale.get(zmq.SRCFD)
    time.sleep(0.5)                   # that peer is gone: zmq closes its descriptor
    other = subprocess.Popen([sys.executable, "-c", code, f"ipc://{tmp_path}/r", "15"])
    try:
        assert router.poll(10000)
        first = router.recv_multipart(copy=False)[-1]
        assert first.get(zmq.SRCFD) == fd, "the kernel gave the new connection another descriptor"
        FrameAuth("s").dropped("a test socket", ValueError("stale"), stale)
        got = [first.bytes]
        while router.poll(1000):
            got.append(router.recv_multipart()[-1])
        assert len(got) == 15, got       # the other process's connection was not shut
    finally:
        other.kill()
        router.close(linger=0)
        ctx.term()


def test_the_store_and_gloo_bind_their_address_only_and_a_stopped_peer_times_a_collective_out():
    """--data-parallel-address is the host's own (not where its host name resolves, the loopback here):
    the store and every gloo listener of both ranks are there, none on another address or 0.0.0.0."""
    import multiprocessing

    from server_utils import rpc_port
    ctx = multiprocessing.get_context("spawn")
    results, port, address = ctx.Queue(), rpc_port(), host_address()
    procs = [ctx.Process(target=_rank, args=(r, port, address, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=120) for _ in range(3))
        head, other = got["listeners of rank 0"], got["listeners of rank 1"]
        assert head.get(port) == address and len(head) > 1 and len(other) > 1, (head, other)   # store, gloo pairs
        assert set(head.values()) == set(other.values()) == {address}, (address, head, other)
        assert 2.5 < got["timed out"] < 15                  # --distributed-timeout-seconds 3, not hours
    finally:
        for p in procs:
            p.kill()
            p.join()


def _join(rank: int, port: int, secret: str, results) -> None:
    from epplat.config import ConfigError, ParallelConfig
    from epplat.core.distributed.parallel_state import init_parallel
    par = ParallelConfig(data_parallel_size=2, data_parallel_rpc_port=port, data_parallel_address="127.0.0.1",
                         distributed_timeout_seconds=20, internal_secret=secret)
    try:
        init_parallel(par, rank, "gloo")
        results.put((rank, "joined"))
    except ConfigError as e:
        results.put((rank, str(e)))


def test_a_node_with_another_secret_is_refused_before_the_world_forms():
    """TCPStore and gloo authenticate nobody: the head checks each rank's proof of the secret first."""
    import multiprocessing

    from server_utils import rpc_port
    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), rpc_port()
    procs = [ctx.Process(target=_join, args=(r, port, secret, results), daemon=True)
             for r, secret in ((0, "deployment"), (1, "another deployment"))]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=60) for _ in range(2))
        assert "world rank(s) [1] do not have this deployment's --internal-secret" in got[0], got
        assert "the head refused this node" in got[1], got
    finally:
        for p in procs:
            p.kill()
            p.join()


@pytest.mark.slow
def test_a_killed_head_of_two_nodes_leaves_no_orphan_and_both_restart_on_the_same_ports(qwen3_moe_dir):
    """DP=2 + EP over two (loopback) nodes: SIGKILL of the head's launcher with a stream in flight ends
    every process of both nodes within 10 s (none keeps the TCPStore or a zmq port), and the same two
    commands then serve again on the same ports, with the same greedy tokens."""
    from server_utils import kill_headless, rpc_port, start_headless
    common = ["--dtype", "float32", "-dp", "2", "--data-parallel-size-local", "1", "--data-parallel-address",
              "127.0.0.1", "--data-parallel-rpc-port", str(rpc_port()), "-ep", "--max-model-len", "256"]
    model, http_port, texts = str(qwen3_moe_dir), None, []
    for run in ("killed", "restarted"):
        headless = start_headless(model, "--data-parallel-start-rank", "1", *common)
        head = None
        try:
            head = Server(model, *common, port=http_port, timeout=180)
            http_port = head.port
            texts.append(greedy(head.url))
            if run == "killed":
                stream = Stream(head.url, 200)
                assert stream.started.wait(60) and stream.chunks, head.output()[-3000:]
                os.kill(head.proc.pid, signal.SIGKILL)      # the head's launcher only, as the OOM killer would
                head.proc.wait(10)
                left = wait_gone(head.proc.pid, 10) + wait_gone(headless.pid, 10)
                assert not left, f"processes outlived the killed head by 10 s: {left}"
            else:
                head.stop()
                headless.wait(30)         # its engines end with the head's
        finally:
            if head is not None:
                head.stop()
                if group_pids(head.proc.pid):
                    os.killpg(head.proc.pid, signal.SIGKILL)
            kill_headless(headless)
    assert texts[0] == texts[1]
