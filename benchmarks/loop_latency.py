"""How long /health waits while the API server is busy: its event loop must never wait on
detokenization, stream writing or the parsing of a large body.

Starts `epplat serve` on a random-weight Qwen3-MoE (single engine), polls /health every
20 ms on one kept-alive connection, and reports its latency (p50 / p99 / max, in ms) in
four phases: idle; while --streams concurrent streams of --tokens tokens each run; while
a --body-mib MiB request body (a prompt of token ids, parsed and then refused as too long)
is sent --bodies times in a row; while --bodies valid bodies of --body-mib MiB alternate
(a /detokenize of token ids, answered with their text, and a completion whose prompt is one
long text, tokenized and refused as over the context), each posted from a child process so
that reading a large answer takes no GIL from the probe. Also prints how many tokens per
second the streams got.

    python benchmarks/loop_latency.py --streams 64 --tokens 400 --out loop_latency.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from soak import launch

MAX_MODEL_LEN = 4096


class HealthProbe(threading.Thread):
    """Polls /health from its own thread (its own connection) and records each answer's latency."""

    def __init__(self, url: str, period: float = 0.02):
        super().__init__(daemon=True)
        self.url, self.period, self.latencies, self.failures = url, period, [], 0
        self.running = threading.Event()
        self.running.set()

    def run(self) -> None:
        with httpx.Client(timeout=30) as c:
            while self.running.is_set():
                t0 = time.perf_counter()
                ok = c.get(self.url + "/health").status_code == 200
                self.latencies.append(time.perf_counter() - t0)
                self.failures += not ok
                time.sleep(self.period)

    def take(self) -> list:
        out, self.latencies = self.latencies, []
        return out


def summary(lat: list) -> dict:
    ms = sorted(x * 1000 for x in lat)
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 2),
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2), "max_ms": round(ms[-1], 2)}


async def streams(url: str, n: int, tokens: int) -> tuple[int, float]:
    async def one(c: httpx.AsyncClient, i: int) -> int:
        body = {"prompt": f"stream {i} of the experts", "max_tokens": tokens, "ignore_eos": True, "stream": True}
        got = 0
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    got += 1
        return got

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=n)) as c:
        chunks = await asyncio.gather(*(one(c, i) for i in range(n)))
    return sum(chunks), time.perf_counter() - t0


def big_bodies(url: str, mib: float, times: int) -> list:
    ids = ",".join(["1234"] * int(mib * (1 << 20) / 5))
    body = ('{"prompt": [' + ids + '], "max_tokens": 1}').encode()
    codes = []
    with httpx.Client(timeout=120) as c:
        for _ in range(times):
            codes.append(c.post(url + "/v1/completions", content=body,
                                headers={"content-type": "application/json"}).status_code)
    return codes


def valid_bodies(url: str, mib: float, times: int, tmp: Path) -> list:
    n = int(mib * (1 << 20))
    (tmp / "detokenize.json").write_bytes(b'{"tokens": [' + b",".join([b"1234"] * (n // 5)) + b"]}")
    (tmp / "completion.json").write_bytes(b'{"prompt": "' + b"experts route tokens " * (n // 21) + b'", "max_tokens": 1}')
    code = ("import httpx, sys; r = httpx.post(sys.argv[1], content=open(sys.argv[2], 'rb').read(), "
            "headers={'content-type': 'application/json'}, timeout=300); print(r.status_code)")
    codes = []
    for i in range(times):
        path, name = (("/detokenize", "detokenize.json"), ("/v1/completions", "completion.json"))[i % 2]
        out = subprocess.run([sys.executable, "-c", code, url + path, str(tmp / name)], capture_output=True, text=True)
        codes.append(f"{path} {out.stdout.strip() or out.stderr[-200:]}")
    return codes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--body-mib", type=float, default=12)
    ap.add_argument("--bodies", type=int, default=5)
    ap.add_argument("--valid-bodies", type=int, default=4)
    ap.add_argument("--serve-args", default="", help="more flags for epplat serve")
    ap.add_argument("--out")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="epplat-loop-"))
    proc, url, cmd = launch(tmp, None, MAX_MODEL_LEN, ["--kv-cache-memory-bytes", "256M", *args.serve_args.split()])
    if proc is None:
        return 1
    try:
        probe = HealthProbe(url)
        probe.start()
        time.sleep(3)
        result = {"idle": summary(probe.take())}
        n_chunks, secs = asyncio.run(streams(url, args.streams, args.tokens))
        result["streams"] = {**summary(probe.take()), "chunks": n_chunks, "tokens_per_s": round(n_chunks / secs)}
        codes = big_bodies(url, args.body_mib, args.bodies)
        result["big_bodies"] = {**summary(probe.take()), "status": sorted(set(codes))}
        codes = valid_bodies(url, args.body_mib, args.valid_bodies, tmp)
        result["valid_bodies"] = {**summary(probe.take()), "status": sorted(set(codes))}
        probe.running.clear()
        probe.join()
        result["health_failures"] = probe.failures
        result["command"], result["args"] = " ".join(cmd), vars(args)
        print(json.dumps(result, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        return 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


if __name__ == "__main__":
    sys.exit(main())
