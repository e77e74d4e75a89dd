"""Soak: a bounded mixed load against `epplat serve` (DP=2 + EP by default) for minutes.

Clients loop until --duration ends, each request drawn at random (seeded) from:
streaming completions and chats that must end with finish_reason "length" after exactly
their max_tokens; non-streaming completions, checked the same way; streams the client
drops after two chunks; and bad requests (broken JSON, a negative temperature, an unknown
model, an empty prompt, a caller chat template, a too-long prompt) that must get their
OpenAI-style 4xx. Every request is counted as completed, failed as expected or lost
(anything else: a 5xx, a dropped connection, a wrong token count, a timeout); the target
is 0 lost. After the load the engines must drain back to 0 running requests and 0 KV
cache use (dropped streams aborted). Prints the counts, the memory (RSS) of the API
server, each engine and the other children every 30 s, and the inter-token latency (ITL)
percentiles of the streams; --out writes them as JSON.

    python benchmarks/soak.py --duration 300 --concurrency 32 --out soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import threading
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

SHAPE = ["--layers", "2", "--hidden", "128", "--head-dim", "32", "--experts", "8", "--top-k", "2", "--heads", "4",
         "--kv-heads", "2", "--moe-intermediate", "128", "--vocab-size", "4096", "--seed", "0"]
MAX_MODEL_LEN = 512
WEIGHTS = {"stream": 40, "chat_stream": 15, "plain": 20, "drop": 10, "bad": 15}
BAD = [  # (body bytes, expected status)
    (b'{"prompt": "x", "max_tokens": ', 400),
    (b'{"prompt": "x", "temperature": -1}', 400),
    (b'{"prompt": "x", "model": "no-such-model"}', 404),
    (b'{"prompt": ""}', 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 'x' * 9 }}"}).encode(), 400),
    (json.dumps({"prompt": "many words " * 2000}).encode(), 400),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return 0.0


def children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p))
            except OSError:
                pass
    return out


def memory(pid: int, log: str) -> dict:
    """RSS in MiB of the API server (the launcher), each engine, and its other children
    (the tokenizer worker, multiprocessing's resource tracker)."""
    engines = {int(p): f"engine_dp{r}" for r, p in re.findall(r"engine \(DP rank (\d+), pid (\d+)\) ready", log)}
    out = {"api_server": round(rss_mib(pid), 1)}
    for c in sorted(children(pid)):
        out[engines.get(c, f"other_{c}")] = round(rss_mib(c), 1)
    return out


class Tally:
    def __init__(self):
        self.sent, self.outcome, self.lost, self.itl = Counter(), Counter(), [], []

    def done(self, kind: str, outcome: str, why: str = "") -> None:
        self.outcome[outcome] += 1
        if outcome == "lost":
            self.lost.append(f"{kind}: {why}"[:300])


async def one(client: httpx.AsyncClient, kind: str, rng: random.Random, tally: Tally) -> None:
    tally.sent[kind] += 1
    max_tokens = rng.randint(8, 64)
    prompt = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "moe"]) for _ in range(rng.randint(4, 60)))
    common = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": rng.choice([0, 0.8])}
    try:
        if kind == "bad":
            body, status = rng.choice(BAD)
            path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
            r = await client.post(path, content=body, headers={"content-type": "application/json"})
            ok = r.status_code == status and r.json().get("error", {}).get("code") == status
            tally.done(kind, "failed_as_expected" if ok else "lost", f"{r.status_code} {r.text[:200]}")
            return
        if kind == "plain":
            r = await client.post("/v1/completions", json={"prompt": prompt, **common})
            ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens
            tally.done(kind, "completed" if ok else "lost", f"{r.status_code} {r.text[:200]}")
            return
        chat = kind == "chat_stream"
        path, body = (("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}) if chat
                      else ("/v1/completions", {"prompt": prompt}))
        body.update(common, stream=True, stream_options={"include_usage": True})
        chunks, finish, usage, last, gaps = 0, None, None, None, []
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                tally.done(kind, "lost", f"{r.status_code} {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if "error" in d:
                    tally.done(kind, "lost", f"error event {d['error']}")
                    return
                if d.get("usage") and not d["choices"]:
                    usage = d["usage"]
                    continue
                now = time.perf_counter()
                if last is not None and chunks > (1 if chat else 0):
                    gaps.append(now - last)
                last, chunks = now, chunks + 1
                finish = d["choices"][0].get("finish_reason") or finish
                if kind == "drop" and chunks == 2:
                    tally.done(kind, "failed_as_expected")    # the client went away, as planned
                    return
        tally.itl.extend(gaps)
        ok = finish == "length" and usage is not None and usage["completion_tokens"] == max_tokens
        tally.done(kind, "completed" if ok else "lost", f"finish {finish} usage {usage}")
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        tally.done(kind, "lost", f"{type(e).__name__}: {e}")


async def load(url: str, duration: float, concurrency: int, seed: int) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + duration
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())

    async def worker(i: int):
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while time.monotonic() < deadline:
                await one(client, rng.choices(kinds, weights)[0], rng, tally)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return tally


def engines_idle(url: str, timeout: float = 30.0) -> dict:
    """Wait for 0 running / waiting requests and 0 KV use; the last values seen."""
    from prometheus_client.parser import text_string_to_metric_families
    deadline, seen = time.time() + timeout, {}
    while time.time() < deadline:
        seen = {s.name: s.value for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text)
                for s in fam.samples if s.name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                                                   "vllm:kv_cache_usage_perc") and "dp_rank" not in s.labels}
        if seen and not any(seen.values()):
            break
        time.sleep(0.5)
    return seen


def percentile(xs: list, q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] * 1000 if len(xs) > 1 else float("nan")


def launch(tmp: Path, model: str | None, max_model_len: int, serve_args: list[str]):
    """`epplat serve` (on a random-weight Qwen3-MoE made in `tmp` when `model` is None), its log in
    tmp/server.log, once healthy: (process, url, command); (None, url, command) when it never was."""
    if model is None:
        model = str(tmp / "model")
        subprocess.run([sys.executable, "-m", "epplat.cli", "make-model", "qwen3_moe", model, *SHAPE], check=True,
                       stdout=subprocess.DEVNULL)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "server.log", "w")
    cmd = [sys.executable, "-m", "epplat.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", str(max_model_len), *serve_args]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while server.poll() is None and time.time() - t0 < 600:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url, cmd
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    print((tmp / "server.log").read_text()[-4000:], file=sys.stderr)
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    return None, url, cmd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", help="checkpoint (default: a random-weight Qwen3-MoE made here)")
    ap.add_argument("--duration", type=float, default=300)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve-args", default="-dp 2 -ep", help="layout flags for epplat serve")
    ap.add_argument("--out")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="epplat-soak-"))
    server, url, cmd = launch(tmp, args.model_dir, MAX_MODEL_LEN, args.serve_args.split())
    if server is None:
        return 1
    try:
        log_path = tmp / "server.log"
        samples, stop = [], threading.Event()

        def sample():      # memory every 30 s of the load: a leak grows steadily, a warming cache levels off
            while True:
                samples.append({"t_s": round(time.time() - t1), **memory(server.pid, log_path.read_text())})
                if stop.wait(30):
                    return

        t1 = time.time()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        tally = asyncio.run(load(url, args.duration, args.concurrency, args.seed))
        wall = time.time() - t1
        stop.set()
        sampler.join()
        idle = engines_idle(url)
        samples.append({"t_s": round(time.time() - t1), **memory(server.pid, log_path.read_text())})
        result = {
            "command": " ".join(cmd), "duration_s": round(wall, 1), "concurrency": args.concurrency,
            "sent": sum(tally.sent.values()), "sent_by_kind": dict(tally.sent),
            "completed": tally.outcome["completed"], "failed_as_expected": tally.outcome["failed_as_expected"],
            "lost": tally.outcome["lost"], "lost_examples": tally.lost[:10],
            "memory_mib": samples, "engines_after": idle,
            "itl_ms": {f"p{q}": round(percentile(tally.itl, q), 2) for q in (50, 90, 99)},
            "itl_samples": len(tally.itl), "server_log": str(log_path),
        }
        print(json.dumps(result, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        return 0 if result["lost"] == 0 else 2
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
