"""Faults and shutdowns with real processes: a killed launcher leaves no engine behind and a
restart on the same port serves; SIGTERM drains in-flight streams and exits 0 without leaving
the socket folder; frames that are garbage or sealed with another deployment's secret are
dropped on every bound internal socket; a stopped (wedged) engine turns /health to 503, ends
in-flight requests with an OpenAI-style 503 and makes the server exit non-zero."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx
import msgspec
import zmq

from epplat.core.engine import protocol as P
from epplat.core.engine.frame_auth import FrameAuth
from server_utils import Server, group_pids

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


def test_bad_frames_are_dropped_and_a_stopped_engine_ends_the_server(qwen3_moe_dir):
    s = Server(str(qwen3_moe_dir), *DP2_EP, env={"EPPLAT_ENGINE_ITERATION_TIMEOUT_S": "3", **GENERATED_SECRET})
    try:
        before = greedy(s.url)
        folder, ctx = ipc_dir(s), zmq.Context()
        stranger = FrameAuth("another deployment's secret")
        fake_output = P.encoder.encode(P.EngineOutputs(0, [P.EngineOutput("cmpl-x-0", [1], finish_reason="stop")]))
        fake_ready = P.encoder.encode(P.EngineReady(0, 4, 4, 4))
        fake_wake = P.encoder.encode(P.Wake(7, 0))
        for kind, name, msg in ((zmq.PUSH, "api0-out", fake_output), (zmq.DEALER, "api0-in", fake_ready),
                                (zmq.PUSH, "wake-in", fake_wake)):
            sock = ctx.socket(kind)
            sock.connect(f"ipc://{folder}/{name}")
            for frame in (b"", b"\xc1garbage", msg, stranger.seal(msg), stranger.seal(b"\x93\x01")):
                sock.send(frame)
            sock.close(linger=2000)
        time.sleep(1.5)
        assert greedy(s.url) == before            # still serving, the same tokens
        log = s.output()
        for where in ("the API server's output socket", "the API server's request socket", "the wake channel"):
            assert f"frame(s) on {where}" in log, where
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
