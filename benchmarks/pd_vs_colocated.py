"""A prefill/decode pair (NixlConnector, `epplat proxy` in front) against one colocated server on
the same load on CPU, one setup at a time, in one run.

The PD setup is a prefill server, a decode server and the proxy on one machine (they share its
cores); the colocated one is a single `epplat serve`. The load is `epplat.tools.bench_serve`:
random token-id prompts of --input-len, --output-len tokens each (ignore_eos, greedy,
streaming), --concurrency in flight, on the benchmark shape of serve_vs_vllm.py. Prints TTFT,
TPOT and throughput of both; writes JSON (--out).

    python benchmarks/pd_vs_colocated.py --out pd.json

On one GPU (gpu_suite.sh's pd-nixl stage) the pair shares the GPU and NixlConnector moves the KV
cache in GPU memory: --kv-buffer-device cuda, and --epplat-arg flags for every server (e.g. the
same --kv-cache-memory-bytes for each, so that the two fit beside each other and the colocated
server has the KV cache of one of them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_vs_vllm import bench_model, busy_warning, free_port, start, stop  # noqa: E402

from epplat.tools.bench_serve import run_benchmark  # noqa: E402

SERVE = [sys.executable, "-m", "epplat.cli", "serve"]


def kv(role: str, device: str) -> str:
    return json.dumps({"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": device})


def start_proxy(port: int, prefill: int, decode: int, log_path: str):
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "epplat.cli", "proxy", "--host", "127.0.0.1", "--port", str(port),
                             "--prefiller-hosts", "127.0.0.1", "--prefiller-ports", str(prefill),
                             "--decoder-hosts", "127.0.0.1", "--decoder-ports", str(decode)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=1, trust_env=False).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"proxy not healthy; see {log_path}")


def load(url: str, args) -> dict:
    return run_benchmark(url, args.model_dir, num_prompts=args.num_prompts, input_len=args.input_len,
                         output_len=args.output_len, concurrency=args.concurrency, tokenizer_dir=args.model_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=None)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--kv-buffer-device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--epplat-arg", action="append", default=[], help="a flag for every epplat serve (repeat)")
    p.add_argument("--logdir", default=None, help="the servers' and the proxy's logs (default: a new temp folder)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logdir = args.logdir or tempfile.mkdtemp(prefix="epplat-pd-")
    os.makedirs(logdir, exist_ok=True)
    args.model_dir = bench_model(args.model_dir, logdir)
    common = [args.model_dir, "--host", "127.0.0.1", "--max-model-len", "4096", "--served-model-name", args.model_dir,
              *args.epplat_arg]
    results = {"config": vars(args).copy()}

    busy = busy_warning("colocated")
    port = free_port()
    proc, _ = start([*SERVE, *common, "--port", str(port)], f"{logdir}/colocated.log", port)
    try:
        results["colocated"] = {**load(f"http://127.0.0.1:{port}", args), "cpu_busy_before": busy}
    finally:
        stop(proc)

    busy = busy_warning("pd pair")
    pp, dp, xp = free_port(), free_port(), free_port()
    env = {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())}
    dev = args.kv_buffer_device
    procs = []
    try:
        procs.append(start([*SERVE, *common, "--port", str(pp), "--kv-transfer-config", kv("kv_producer", dev)],
                           f"{logdir}/prefill.log", pp, env)[0])
        procs.append(start([*SERVE, *common, "--port", str(dp), "--kv-transfer-config", kv("kv_consumer", dev)],
                           f"{logdir}/decode.log", dp)[0])
        procs.append(start_proxy(xp, pp, dp, f"{logdir}/proxy.log"))
        results["pd pair"] = {**load(f"http://127.0.0.1:{xp}", args), "cpu_busy_before": busy}
    finally:
        for proc in reversed(procs):
            stop(proc)
    for name in ("colocated", "pd pair"):
        r = results[name]
        print(f"{name}: TTFT p50 {r['median_ttft_ms']:.0f} ms (mean {r['mean_ttft_ms']:.0f}), TPOT p50 "
              f"{r['median_tpot_ms']:.1f} ms, {r['output_throughput']:.1f} output tok/s, "
              f"{r['request_throughput']:.2f} req/s, {r['failed']} failed")
    print(f"logs: {logdir}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
