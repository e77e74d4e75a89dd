"""End-to-end serving on one GPU: `epplat serve --platform cuda` under `epplat bench serve`
load, against transformers `generate` on the same checkpoint, GPU, dtype and prompts, in one run.

Makes a random-weight checkpoint shaped like Qwen3-30B-A3B (hidden 2048, 32/4 heads of 128,
128 experts top-8, expert width 768, vocab 151936, bf16) with --layers layers (48 is the
real model; fewer keep the checkpoint small enough for the machine's disk), serves it,
runs the load (random prompts of --input-len tokens, --output-len tokens with ignore_eos,
greedy, streaming, --concurrency in flight), stops the server, then runs transformers
`generate` on the same prompts in batches of --concurrency.

    python benchmarks/serve_1gpu.py --layers 12 --out serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from serve_vs_vllm import free_port, serve_and_load  # noqa: E402

from epplat.tools.bench_serve import random_prompts  # noqa: E402

SHAPE = ["--hidden", "2048", "--heads", "32", "--kv-heads", "4", "--head-dim", "128", "--experts", "128",
         "--top-k", "8", "--moe-intermediate", "768", "--vocab-size", "151936", "--dtype", "bfloat16",
         "--max-shard-size", "4GB", "--seed", "0"]


def transformers_generate(args) -> dict:
    """transformers `generate` on the GPU in bf16: greedy, exactly output_len tokens, batches of concurrency."""
    import torch
    from transformers import AutoModelForCausalLM
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    load_s = time.perf_counter() - t0
    prompts = random_prompts(args.model_dir, args.num_prompts, args.input_len, args.seed)
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad
    pad = pad[0] if isinstance(pad, list) else pad
    new, t0 = 0, 0.0
    with torch.no_grad():
        for i in range(-args.concurrency, len(prompts), args.concurrency):   # first batch: untimed warm-up
            if i == 0:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            batch = torch.tensor(prompts[max(i, 0):max(i, 0) + args.concurrency], device="cuda")
            out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=args.output_len,
                                 min_new_tokens=args.output_len, do_sample=False, pad_token_id=pad)
            if i >= 0:
                new += (out.shape[1] - batch.shape[1]) * batch.shape[0]
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"transformers generate: {new / dt:.1f} output tok/s (load {load_s:.0f} s)", flush=True)
    return {"output_throughput": new / dt, "duration_s": dt, "total_output_tokens": new, "load_s": load_s,
            "transformers": __import__("transformers").__version__}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=None, help="serve this checkpoint (default: make one in a temp dir)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epplat-arg", action="append", default=[], metavar="ARG", help="extra `epplat serve` argument")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    logdir = tempfile.mkdtemp(prefix="serve_1gpu_")
    if a.model_dir is None:
        a.model_dir = os.path.join(logdir, "model")
        t0 = time.perf_counter()
        subprocess.run(["epplat", "make-model", "qwen3_moe", a.model_dir, "--layers", str(a.layers), *SHAPE], check=True)
        print(f"make-model: {time.perf_counter() - t0:.0f} s", flush=True)
    port = free_port()
    cmd = ["epplat", "serve", a.model_dir, "--platform", "cuda", "--dtype", "bfloat16", "--port", str(port),
           "--max-model-len", str(a.input_len + a.output_len + 16), "--max-num-seqs", str(max(a.concurrency, 1)),
           *a.epplat_arg]
    results = {"epplat": serve_and_load("epplat", cmd, port, a, logdir)}
    if not a.skip_transformers:
        results["transformers"] = transformers_generate(a)
    ep, hf = results["epplat"], results.get("transformers")
    print(f"\n{'engine':<22}{'out tok/s':>11}{'TTFT p50':>10}{'TPOT p50':>10}{'ITL p50/p99':>14}{'vs transformers':>17}")
    print(f"{'epplat serve (cuda)':<22}{ep['output_throughput']:>11.1f}{ep['median_ttft_ms']:>8.0f}ms"
          f"{ep['median_tpot_ms']:>8.1f}ms{ep['median_itl_ms']:>7.1f}/{ep['p99_itl_ms']:.1f}ms"
          + (f"{ep['output_throughput'] / hf['output_throughput']:>16.2f}x" if hf else ""))
    print(f"prompt tok/s {ep['total_input_tokens'] / ep['duration_s']:.0f}, total tok/s {ep['total_token_throughput']:.0f}, "
          f"TTFT p99 {ep.get('p99_ttft_ms', float('nan')):.0f} ms, failed {ep['failed']}")
    if hf:
        print(f"{'transformers generate':<22}{hf['output_throughput']:>11.1f}{'-':>10}{'-':>10}{'-':>14}{1:>16.2f}x")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
