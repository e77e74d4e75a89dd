"""TTFT of a shared-prefix workload with prefix caching on and off, one server at a time, in one run.

Every prompt is the same --prefix-len random tokens (a system prompt) and --input-len random
ones of its own (a question); --output-len tokens each, greedy, streaming, --concurrency in
flight (`epplat.tools.bench_serve` with vLLM's --random-prefix-len meaning). The benchmark's
untimed warmup request carries the shared prefix, so with caching on every timed request
finds it cached, as a deployed system prompt is. The checkpoint is the benchmark shape of
serve_vs_vllm.py (random weights, `epplat make-model`). Prints a table, writes JSON (--out).

    python benchmarks/prefix_cache_ttft.py --out prefix.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_vs_vllm import bench_model, busy_warning, free_port, start, stop  # noqa: E402

from epplat.tools.bench_serve import run_benchmark  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=None, help="checkpoint (default: make the benchmark shape)")
    p.add_argument("--prefix-len", type=int, default=1500)
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logdir = tempfile.mkdtemp(prefix="epplat-prefix-")
    args.model_dir = bench_model(args.model_dir, logdir)
    results = {"config": vars(args).copy()}
    for name, flag in (("prefix caching on", "--enable-prefix-caching"),
                       ("prefix caching off", "--no-enable-prefix-caching")):
        port = free_port()
        cmd = [sys.executable, "-m", "epplat.cli", "serve", args.model_dir, "--host", "127.0.0.1", "--port",
               str(port), "--max-model-len", "4096", flag]
        busy = busy_warning(name)
        proc, _ = start(cmd, f"{logdir}/{flag}.log", port)
        try:
            r = run_benchmark(f"http://127.0.0.1:{port}", None, num_prompts=args.num_prompts,
                              input_len=args.input_len, output_len=args.output_len, concurrency=args.concurrency,
                              tokenizer_dir=args.model_dir, prefix_len=args.prefix_len)
        finally:
            stop(proc)
        r.update(command=cmd, cpu_busy_before=busy)
        results[name] = r
        print(f"{name}: TTFT mean {r['mean_ttft_ms']:.1f} ms, p50 {r['median_ttft_ms']:.1f} ms, "
              f"p99 {r['p99_ttft_ms']:.1f} ms; TPOT p50 {r['median_tpot_ms']:.2f} ms; "
              f"{r['request_throughput']:.2f} req/s; {r['failed']} failed", flush=True)
    on, off = results["prefix caching on"], results["prefix caching off"]
    print(f"TTFT p50 off/on: {off['median_ttft_ms'] / on['median_ttft_ms']:.1f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
