"""Elastic EP on CPU: seconds from POST /scale_elastic_ep to its 200, up and down, under a streaming
load, the requests lost to the scales (the target is 0) and the longest gap between two tokens a
running stream saw while a scale ran.

Starts `epplat serve` (the built-in demo model unless --model; DP --dp, EP, --enable-elastic-ep,
EPLB) and keeps --concurrency streaming completions running from start to end; each one must
end with finish_reason "length" after exactly its max_tokens, else it counts as lost. It then
scales dp -> each size of --sizes in turn, --cycles times, waiting --settle seconds between
scales, and prints one line per scale plus a summary (JSON with --out).

    python benchmarks/elastic_ep_bench.py --dp 2 --sizes 3,2,4,2 --cycles 2
    python benchmarks/elastic_ep_bench.py --dp 1 --tp 2 --sizes 2,1 --cycles 3
    RAY_ADDRESS=HOST:PORT python benchmarks/elastic_ep_bench.py --data-parallel-backend ray --sizes 3,2 --cycles 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Streams:
    """--concurrency clients, each looping over streaming completions until stopped, on threads of a
    process of their own (so that the scale requests' timing does not wait for their GIL)."""

    def __init__(self, url: str, model: str, concurrency: int, max_tokens: int):
        ctx = multiprocessing.get_context("spawn")
        self.stop, self.results = ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(target=_load, args=(url, model, concurrency, max_tokens, self.stop, self.results))
        self.proc.start()
        self.completed = self.lost = 0
        self.errors: list = []
        self.gaps: list = []        # (time.monotonic() of a chunk, gap since that stream's previous chunk)

    def finish(self) -> None:
        self.stop.set()
        self.completed, self.lost, self.errors, self.gaps = self.results.get(timeout=600)
        self.proc.join(60)

    def longest_gap(self, t0: float, t1: float) -> float:
        """The longest inter-chunk gap that ended inside [t0, t1] (after finish())."""
        return max((g for t, g in self.gaps if t0 <= t <= t1), default=0.0)

    def median_gap(self) -> float:
        return statistics.median(g for _, g in self.gaps) if self.gaps else 0.0


def _load(url, model, concurrency, max_tokens, stop, results) -> None:
    lock, state = threading.Lock(), {"completed": 0, "lost": 0, "errors": [], "gaps": []}

    def client(i: int) -> None:
        body = {"model": model, "prompt": [11 + i, 222, 333, 44], "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=300) as http:
            while not stop.is_set():
                n, finish, last, gaps = 0, None, None, []
                try:
                    with http.stream("POST", url + "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if chunk.get("usage"):
                                n = chunk["usage"]["completion_tokens"]
                            for c in chunk.get("choices", []):
                                finish = c.get("finish_reason") or finish
                                now = time.monotonic()
                                if last is not None:
                                    gaps.append((now, now - last))
                                last = now
                    err = None if finish == "length" and n == max_tokens else f"finish_reason {finish!r}, {n} tokens"
                except Exception as e:      # noqa: BLE001 (a dropped connection is a lost request)
                    err = repr(e)
                with lock:
                    state["gaps"] += gaps
                    state["completed" if err is None else "lost"] += 1
                    if err is not None:
                        state["errors"].append(err)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put((state["completed"], state["lost"], state["errors"], state["gaps"]))


def _last_scale_line(path: str) -> str:
    """The server's account of its last scale: its parts' seconds (start, drain, re-form)."""
    lines = [ln for ln in open(path) if "elastic EP: scaled from" in ln]
    return lines[-1].split("elastic EP: ", 1)[1].strip() if lines else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the built-in demo model)")
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--tp", type=int, default=1, help="--tensor-parallel-size (a DP rank is this many processes)")
    ap.add_argument("--sizes", default="3,2,4,2", help="the DP sizes to scale to, in turn")
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of load between scales")
    ap.add_argument("--redundant", type=int, default=0, help="EPLB num_redundant_experts at the start")
    ap.add_argument("--data-parallel-backend", default="mp", choices=("mp", "ray"),
                    help="ray: the DP ranks, new ones too, are actors on the Ray cluster of RAY_ADDRESS")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix="elastic-bench-", suffix=".log", delete=False)
    eplb = json.dumps({"num_redundant_experts": args.redundant, "window_size": 64, "step_interval": 100000})
    cmd = [sys.executable, "-m", "epplat.cli", "serve", *([args.model] if args.model else []), "--host", "127.0.0.1",
           "--port", str(port), "-dp", str(args.dp), "-tp", str(args.tp), "-ep", "--enable-elastic-ep", "--enable-eplb",
           "--eplb-config", eplb, "--kv-cache-memory-bytes", "256M", "--max-model-len", "1024",
           "--data-parallel-backend", args.data_parallel_backend]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        if not _healthy(server, url):
            print(open(log.name).read()[-3000:], file=sys.stderr)
            return 1
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        streams = Streams(url, model, args.concurrency, args.max_tokens)
        time.sleep(args.settle)
        rows, size = [], args.dp
        for _ in range(args.cycles):
            for new in (int(x) for x in args.sizes.split(",")):
                t0 = time.monotonic()
                r = httpx.post(url + "/scale_elastic_ep", json={"new_data_parallel_size": new}, timeout=600)
                t1 = time.monotonic()
                row = {"from": size, "to": new, "status": r.status_code, "seconds": round(t1 - t0, 3),
                       "window": (t0, t1 + 0.5), "server": _last_scale_line(log.name)}
                rows.append(row)
                if r.status_code == 200:
                    size = new
                time.sleep(args.settle)
        streams.finish()
        for row in rows:
            row["longest_gap_s"] = round(streams.longest_gap(*row.pop("window")), 3)
            print(json.dumps(row), flush=True)
        up = [r["seconds"] for r in rows if r["to"] > r["from"] and r["status"] == 200]
        down = [r["seconds"] for r in rows if r["to"] < r["from"] and r["status"] == 200]
        summary = {"scales": rows, "scale_up_s_median": statistics.median(up) if up else None,
                   "scale_down_s_median": statistics.median(down) if down else None,
                   "longest_gap_s": max(r["longest_gap_s"] for r in rows) if rows else None,
                   "median_gap_s": round(streams.median_gap(), 4),
                   "requests_completed": streams.completed, "requests_lost": streams.lost,
                   "errors": streams.errors[:5]}
        print(json.dumps({k: v for k, v in summary.items() if k != "scales"}))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=1)
        return 0 if streams.lost == 0 and all(r["status"] == 200 for r in rows) else 1
    finally:
        _stop(server)


def _healthy(server: subprocess.Popen, url: str, timeout: float = 300.0) -> bool:
    """Whether the server answers /health with 200 within ``timeout`` s (False: it exited or never did)."""
    end = time.time() + timeout
    while server.poll() is None and time.time() < end:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return True
        time.sleep(0.3)
    return False


def _stop(server: subprocess.Popen) -> None:
    """The server's process group: SIGTERM, and SIGKILL for what is left after 30 s."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if server.poll() is not None:
            return
        os.killpg(server.pid, sig)
        try:
            server.wait(grace)
        except subprocess.TimeoutExpired:
            pass


if __name__ == "__main__":
    sys.exit(main())
