"""Elastic EP with external load balancing on CPU (loopback): a server that joins the running group and
leaves it again on SIGTERM, while the other servers stream; the seconds of each, the longest gap between
two tokens on the other servers' streams meanwhile, and the requests lost (the target is 0).

Starts servers 0 and 1 (`epplat serve --data-parallel-rank N`, DP 2, EP, --enable-elastic-ep, EPLB; the
built-in demo model unless --model) with --concurrency streaming completions on each (elastic_ep_bench's
Streams), then --cycles times: starts server 2 (it joins: 2 -> 3) and waits until it is healthy, then
stops it with SIGTERM (it leaves: 3 -> 2) and waits until it exited. "seconds" is from the start (or the
signal) to healthy (or exited): a join includes a whole `epplat serve` start; "re-form" is rank 0's own
account of the re-forming ("... s on this rank" in its log).

    python benchmarks/elastic_ep_external_bench.py --cycles 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from elastic_ep_bench import Streams, _healthy, _stop, free_port  # noqa: E402


def _serve(args, rank: int, size: int, rpc: int):
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix=f"elastic-ext-{rank}-", suffix=".log", delete=False)
    eplb = json.dumps({"num_redundant_experts": args.redundant, "window_size": 64, "step_interval": 100000})
    cmd = [sys.executable, "-m", "epplat.cli", "serve", *([args.model] if args.model else []), "--host", "127.0.0.1",
           "--port", str(port), "-dp", str(size), "--data-parallel-rank", str(rank), "--data-parallel-address",
           "127.0.0.1", "--data-parallel-rpc-port", str(rpc), "-ep", "--enable-elastic-ep", "--enable-eplb",
           "--eplb-config", eplb, "--kv-cache-memory-bytes", "256M", "--max-model-len", "1024"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "EPPLAT_INTERNAL_SECRET": "elastic-ext-bench",
           "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    return proc, f"http://127.0.0.1:{port}", log.name


def _reform_seconds(log: str, generation: int) -> float | None:
    m = re.search(rf"DP ranks \(world generation {generation}\): \d+ expert moves, ([\d.]+) s on this rank",
                  open(log).read())
    return float(m.group(1)) if m else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=2, help="streams on each of servers 0 and 1")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--redundant", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each server")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rpc = free_port()
    servers = [_serve(args, r, 2, rpc) for r in (0, 1)]
    joiner = None
    try:
        if not all(_healthy(p, url) for p, url, _ in servers):
            print(open(servers[0][2]).read()[-3000:], file=sys.stderr)
            return 1
        model = httpx.get(servers[0][1] + "/v1/models").json()["data"][0]["id"]
        loads = [Streams(url, model, args.concurrency, args.max_tokens) for _, url, _ in servers]
        time.sleep(args.settle)
        rows = []
        for _ in range(args.cycles):
            t0 = time.monotonic()
            joiner = _serve(args, 2, 3, rpc)
            ok = _healthy(joiner[0], joiner[1])
            rows.append({"change": "join 2 -> 3", "ok": ok, "seconds": round(time.monotonic() - t0, 2),
                         "window": (t0, time.monotonic() + 0.5)})
            time.sleep(args.settle)
            t0 = time.monotonic()
            os.killpg(joiner[0].pid, signal.SIGTERM)
            code = joiner[0].wait(120)
            rows.append({"change": "leave 3 -> 2", "ok": code == 0, "seconds": round(time.monotonic() - t0, 2),
                         "window": (t0, time.monotonic() + 0.5)})
            joiner = None
            time.sleep(args.settle)
        for load in loads:
            load.finish()
        for i, row in enumerate(rows):
            row["re-form_s"] = _reform_seconds(servers[0][2], i + 1)
            row["longest_gap_s"] = round(max(load.longest_gap(*row["window"]) for load in loads), 3)
            del row["window"]
            print(json.dumps(row), flush=True)
        summary = {"rows": rows, "requests_completed": sum(x.completed for x in loads),
                   "requests_lost": sum(x.lost for x in loads), "errors": [e for x in loads for e in x.errors][:5],
                   "median_gap_s": round(max(x.median_gap() for x in loads), 4)}
        print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=1)
        return 0 if summary["requests_lost"] == 0 and all(r["ok"] for r in rows) else 1
    finally:
        if joiner is not None:
            _stop(joiner[0])
        for proc, _, _ in reversed(servers):
            _stop(proc)


if __name__ == "__main__":
    raise SystemExit(main())
