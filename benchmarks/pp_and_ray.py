"""Pipeline parallelism against one stage on CPU on the same load, and start-up with the Ray backend
against mp, one setup at a time, in one run.

Setups: `epplat serve` with one stage (mp), with the engine's default threads (all cores) and with
OMP_NUM_THREADS=1 (as many threads as each PP=2 stage gets on 2 cores); `-pp 2` (mp); `-pp 2 --distributed-executor-backend ray`
on a Ray cluster this script starts first (ray.cluster_utils.Cluster: one node with --ray-cpus CPUs;
its own start-up is not counted: the backend joins an existing cluster). The load is
`epplat.tools.bench_serve` on the benchmark shape of serve_vs_vllm.py (random token-id prompts,
greedy, streaming, --concurrency in flight). Start-up is launch to /health 200. Prints and writes
JSON (--out).

    python benchmarks/pp_and_ray.py --out pp_ray.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_vs_vllm import bench_model, free_port, serve_and_load  # noqa: E402

SERVE = [sys.executable, "-m", "epplat.cli", "serve"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=None, help="default: the benchmark shape, made with epplat make-model")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logdir = tempfile.mkdtemp(prefix="pp-ray-bench-")
    args.model_dir = bench_model(args.model_dir, logdir)
    common = ["--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory-bytes", "512M"]
    results = {}
    for name, extra, env in (("1 stage (mp)", [], None), ("1 stage (mp), 1 thread", [], {"OMP_NUM_THREADS": "1"}),
                             ("PP=2 (mp)", ["-pp", "2"], None)):
        port = free_port()
        results[name] = serve_and_load(name, [*SERVE, args.model_dir, "--port", str(port), *common, *extra], port,
                                       args, logdir, env=env)
    from ray.cluster_utils import Cluster
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.ray_cpus})
    cluster.wait_for_nodes()
    print(f"ray cluster (1 node, {args.ray_cpus} CPUs) up in {time.perf_counter() - t0:.1f}s (not counted)", flush=True)
    try:
        port = free_port()
        name = "PP=2 (ray)"
        results[name] = serve_and_load(name, [*SERVE, args.model_dir, "--port", str(port), *common, "-pp", "2",
                                              "--distributed-executor-backend", "ray"], port, args, logdir,
                                       env={"RAY_ADDRESS": cluster.address})
    finally:
        cluster.shutdown()
    print("\n| setup | start-up to /health | output tok/s | TTFT p50 | ITL p50 | CPU busy before |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['time_to_healthy_s']:.1f} s | {r['output_throughput']:.1f} | {r['median_ttft_ms']:.0f} ms "
              f"| {r['median_itl_ms']:.1f} ms | {r['cpu_busy_before']:.0%} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
