"""Engine step times on the cpu platform, with its C kernels and with the torch ops alone.

Makes (or takes) the serving benchmark's checkpoint, puts BATCH requests of PROMPT random
tokens into an in-process engine core (after one warm-up prefill), and times the prefill step and then decode steps
(minimum and median of --steps). Each configuration runs in its own process, one after
the other on the same checkpoint; EPPLAT_CPU_KERNELS=0 turns the kernels off.

    python benchmarks/cpu_step.py --batch 16 --prompt 128
    python benchmarks/cpu_step.py --experts      # the expert computation alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SHAPE = ["--layers", "4", "--hidden", "256", "--head-dim", "64", "--experts", "16", "--top-k", "4", "--heads", "4",
         "--kv-heads", "2", "--moe-intermediate", "256", "--seed", "0"]


def measure(model_dir: str, batch: int, prompt: int, steps: int) -> dict:
    import torch

    from epplat.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from epplat.core.engine.core import EngineCore
    from epplat.core.engine.protocol import EngineRequest, SamplingParams
    from epplat.platforms.cpu.platform import CpuPlatform

    cfg = EngineConfig(ModelConfig(model_dir, dtype="float32"),
                       scheduler=SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=batch * prompt),
                       cache=CacheConfig(block_size=16, kv_cache_memory_bytes=256 << 20))
    core = EngineCore(cfg, CpuPlatform(), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for i in range(batch):     # warm-up: one prefill of the same size, first touches of the KV cache
        core.add_request(EngineRequest(f"w{i}", torch.randint(3, 2000, (prompt,), generator=g).tolist(),
                                       SamplingParams(max_tokens=1), eos_token_ids=[]))
    while core.has_work():
        core.step()
    for i in range(batch):
        core.add_request(EngineRequest(str(i), torch.randint(3, 2000, (prompt,), generator=g).tolist(),
                                       SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True),
                                       eos_token_ids=[]))
    t = time.perf_counter()
    first = core.step()
    prefill = time.perf_counter() - t
    tokens = [[o.new_token_ids[0] for o in first]]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = core.step()
        times.append(time.perf_counter() - t)
        tokens.append([o.new_token_ids[0] for o in out])
    return {"prefill_ms": prefill * 1e3, "decode_min_ms": min(times) * 1e3,
            "decode_median_ms": statistics.median(times) * 1e3, "tokens": tokens}


def experts_alone(threads: int) -> list[str]:
    """The MoE experts of the benchmark shape (4 layers, 16 experts, hidden 256, width 256, top-4)
    alone: kernel against torch's grouped GEMMs, and a plain read of the same weights."""
    import torch
    import torch.nn.functional as F

    from epplat.core.moe.experts import reference_experts
    from epplat.platforms.cpu import cpu_kernels
    cpu_kernels.load()
    torch.set_num_threads(threads)
    cpu_kernels.THREADS = threads
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(16, 256, 512, generator=g), torch.randn(16, 256, 256, generator=g)) for _ in range(4)]
    nbytes = sum(w.numel() * 4 for pair in layers for w in pair)

    def best(fn, n=15):
        fn()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    lines = []
    for tokens in (16, 2048):
        x = torch.randn(tokens, 256, generator=g)
        ids = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(tokens)])
        w = torch.rand(tokens, 4, generator=g)
        ref = best(lambda: [reference_experts(x, ids, w, a, b, F.silu) for a, b in layers])
        ker = best(lambda: [cpu_kernels.moe_experts(x, ids, w, a, b, F.silu) for a, b in layers])
        lines.append(f"experts, {tokens} tokens, 4 layers: torch {ref * 1e3:.2f} ms, kernel {ker * 1e3:.2f} ms "
                     f"({nbytes / ker / 1e9:.1f} GB/s of weights)")
    read = best(lambda: [(a.sum(), b.sum()) for a, b in layers])
    lines.append(f"plain read (sum) of the same {nbytes / 1e6:.0f} MB: {read * 1e3:.2f} ms ({nbytes / read / 1e9:.1f} GB/s)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--experts", action="store_true", help="time the MoE experts alone instead")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.model_dir, args.batch, args.prompt, args.steps)))
        return 0
    if args.experts:
        print("\n".join(experts_alone(torch_threads())))
        return 0
    if args.model_dir is None:
        args.model_dir = tempfile.mkdtemp(prefix="epplat-cpu-step-")
        subprocess.run([sys.executable, "-m", "epplat.cli", "make-model", "qwen3_moe", args.model_dir, *SHAPE],
                       check=True, capture_output=True)
    rows = {}
    for name, flag in (("torch ops", "0"), ("C kernels", "1")):
        r = subprocess.run([sys.executable, __file__, "--child", "--model-dir", args.model_dir, "--batch",
                            str(args.batch), "--prompt", str(args.prompt), "--steps", str(args.steps)],
                           env={**os.environ, "EPPLAT_CPU_KERNELS": flag}, capture_output=True, text=True, check=True)
        rows[name] = json.loads(r.stdout.strip().splitlines()[-1])
    same = rows["torch ops"]["tokens"] == rows["C kernels"]["tokens"]
    print(f"batch {args.batch}, prompt {args.prompt} tokens, torch {torch_threads()} threads")
    print(f"{'':10s} {'prefill':>10s} {'decode min':>11s} {'decode p50':>11s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['prefill_ms']:8.1f}ms {r['decode_min_ms']:9.2f}ms {r['decode_median_ms']:9.2f}ms")
    base, fast = rows["torch ops"], rows["C kernels"]
    print(f"speedup: prefill {base['prefill_ms'] / fast['prefill_ms']:.2f}x, decode (median) "
          f"{base['decode_median_ms'] / fast['decode_median_ms']:.2f}x; same greedy tokens: {same}")
    return 0 if same else 1


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
