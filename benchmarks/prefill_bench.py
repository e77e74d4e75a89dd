"""In-process prefill step on one GPU against its bf16 FLOP roofline, measured in the same run.

Builds the random-weight model of ``decode_roofline.py`` (Qwen3-30B-A3B shape by default,
bf16) on the GPU and times one prefill step (model forward over SEQS prompts of LEN tokens
with nothing cached, then the logits of each prompt's last token) with each expert path in
turn: the cuda platform's (``cuda_experts``: its fused prefill layer and expert kernels) and
torch._grouped_mm above the decode-sized Triton kernels (what it ran before ``triton_moe_sorted``;
the modules then run the layer), with --compare-modules the platform's kernels module by module. Its
prompts start fresh, so the platform's attention is SDPA per chunk (benchmarks/prefill_attention_bench.py
times the one-launch kernel for chunks after a cached prefix). The roofline is the step's
matrix FLOPs (projections, router, the routed experts, causal attention, logits) over the
8192^3 bf16 matmul rate of the same run. Also reports the host time to build the step's
attention metadata and to issue the step (when that is near the step time, the step is
bound by the host's kernel launches, not the GPU), and with --profile the GPU kernels and
host ops of one step. With --fp8, the same steps again after the experts are quantized as
``--quantization fp8`` does at load (128x128 block-scaled float8_e4m3), side by side in one run.

    python benchmarks/prefill_bench.py --seqs 1 4 --len 2048 --profile [--fp8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
import triton

from decode_roofline import build_model, model_args, set_kernels
from epplat.core.model.attention import build_attn_metadata
from epplat.core.moe.experts import capturable_experts
from epplat.platforms.cuda import triton_moe


def grouped_above_decode(x, topk_ids, topk_weights, w13, w2, act):
    """The expert path before triton_moe_sorted: decode-sized Triton kernels, else grouped GEMM."""
    if topk_ids.numel() <= triton_moe.MAX_ASSIGNMENTS:
        out = triton_moe.triton_experts(x, topk_ids, topk_weights, w13, w2, act)
        if out is not None:
            return out
    return capturable_experts(x, topk_ids, topk_weights, w13, w2, act)


def step_flops(a, seqs: int, length: int) -> float:
    tokens = seqs * length
    proj = 2 * tokens * a.hidden * (a.heads + 2 * a.kv_heads) * a.head_dim + 2 * tokens * a.heads * a.head_dim * a.hidden
    router = 2 * tokens * a.hidden * a.experts
    moe = 2 * tokens * a.top_k * 3 * a.hidden * a.moe_intermediate
    attn = seqs * 2 * 2 * a.heads * a.head_dim * length * (length + 1) / 2     # QK^T and PV over the causal half
    return a.layers * (proj + router + moe + attn) + 2 * seqs * a.hidden * a.vocab


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_args(p)
    p.add_argument("--seqs", type=int, nargs="+", default=[1, 4])
    p.add_argument("--len", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--profile", action="store_true", help="print the top GPU kernels of a step of the first size")
    p.add_argument("--compare-modules", action="store_true",
                   help="also time the step with the layers run module by module (Kernels.decoder_layer off)")
    p.add_argument("--host-profile", action="store_true",
                   help="print where the host time of issuing a step of the first size goes (cProfile, by function)")
    p.add_argument("--fp8", action="store_true", help="also time the steps with the experts in fp8")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev, dtype = torch.device("cuda", 0), torch.bfloat16
    model = build_model(a, dev, dtype, a.len + 64)
    per_seq = -(-a.len // a.block_size)
    nblocks = max(a.seqs) * per_seq
    for layer in model.layers:
        shape = (nblocks + 2, a.block_size, a.kv_heads, a.head_dim)
        layer.self_attn.kv_cache = (torch.zeros(shape, device=dev, dtype=dtype), torch.zeros(shape, device=dev, dtype=dtype))
    n = 8192
    x, y = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    rate = 2 * n ** 3 / (triton.testing.do_bench(lambda: x @ y, warmup=50, rep=300, return_mode="median") * 1e-3)
    del x, y
    paths = {"cuda_experts": model.kernels, "grouped_mm": dataclasses.replace(model.kernels, experts=grouped_above_decode)}
    if a.compare_modules:       # the layer module by module (no fused prefill layer), the platform's kernels
        paths["modules"] = dataclasses.replace(model.kernels, decoder_layer=None)
    rows = []
    for s in a.seqs:
        seqs = [(a.len, a.len, list(range(i * per_seq, (i + 1) * per_seq))) for i in range(s)]
        ids = torch.randint(0, a.vocab, (s * a.len,), device=dev)
        pos = torch.arange(a.len, device=dev).repeat(s)
        last = torch.arange(1, s + 1, device=dev) * a.len - 1
        host = triton.testing.do_bench(lambda: build_attn_metadata(seqs, a.block_size, dev, nblocks, model.kernels),
                                       warmup=5, rep=100, return_mode="median")
        meta = build_attn_metadata(seqs, a.block_size, dev, nblocks, model.kernels)
        flops = step_flops(a, s, a.len)
        row = {"seqs": s, "tokens": s * a.len, "gflop": flops / 1e9, "roofline_ms": flops / rate * 1e3,
               "metadata_ms": host}
        with torch.inference_mode():
            for name, kernels in paths.items():
                set_kernels(model, kernels)
                row[name + "_ms"] = triton.testing.do_bench(lambda: model.compute_logits(model(ids, pos, meta)[last]),
                                                            warmup=100, rep=1000, return_mode="median")
            set_kernels(model, paths["cuda_experts"])
            issue = []
            for _ in range(5):       # host time to issue a step (the GPU may still be running it)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.compute_logits(model(ids, pos, meta)[last])
                issue.append(time.perf_counter() - t0)
            row["issue_ms"] = statistics.median(issue) * 1e3
            if a.host_profile and s == a.seqs[0]:
                import cProfile
                import pstats
                torch.cuda.synchronize()
                with cProfile.Profile() as cp:
                    for _ in range(3):       # the GPU lags the host: no wait inside
                        model.compute_logits(model(ids, pos, meta)[last])
                torch.cuda.synchronize()
                st = pstats.Stats(cp)
                print(f"{s} x {a.len} tokens, host time of issuing 3 steps by function (cProfile inflates Python):")
                st.sort_stats("tottime").print_stats(28)
                st.sort_stats("cumulative").print_stats(28)
            if a.profile and s == a.seqs[0]:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    model.compute_logits(model(ids, pos, meta)[last])
                    torch.cuda.synchronize()
                events = prof.key_averages()
                on_gpu = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
                kernels = sum(e.count for e in on_gpu)
                gpu = sum(e.self_device_time_total for e in on_gpu) / 1e3
                print(f"{s} x {a.len} tokens, one prefill step: {kernels} GPU kernels, {gpu:.1f} ms of GPU time; "
                      "by kernel:")
                print(events.table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=70))
                print("host time by op:")
                print(events.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=70))
        rows.append(row)
    if a.fp8:
        from epplat.platforms.cuda.fp8 import Fp8BlockQuant
        from epplat.platforms.cuda.fp8_moe import quantize
        set_kernels(model, paths["cuda_experts"])
        for layer in model.layers:
            (q13, s13), (q2, s2) = quantize(layer.mlp.w13.data), quantize(layer.mlp.w2.data)
            Fp8BlockQuant._swap(layer.mlp, q13, q2, s13, s2)
        torch.cuda.empty_cache()
        paths["fp8"] = None
        for row in rows:
            s = row["seqs"]
            seqs = [(a.len, a.len, list(range(i * per_seq, (i + 1) * per_seq))) for i in range(s)]
            ids = torch.randint(0, a.vocab, (s * a.len,), device=dev)
            pos = torch.arange(a.len, device=dev).repeat(s)
            last = torch.arange(1, s + 1, device=dev) * a.len - 1
            meta = build_attn_metadata(seqs, a.block_size, dev, nblocks, model.kernels)
            with torch.inference_mode():
                row["fp8_ms"] = triton.testing.do_bench(lambda: model.compute_logits(model(ids, pos, meta)[last]),
                                                        warmup=100, rep=1000, return_mode="median")
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {rate / 1e12:.0f} TFLOP/s (8192^3, this run); {a.layers} layers, "
          f"{a.experts} experts top-{a.top_k}, hidden {a.hidden}; one prefill step with logits, median ms")
    print(f"{'prompts':>8}{'tokens':>8}{'GFLOP':>8}{'roofline':>10}" + "".join(f"{k:>14}{'/roof':>6}" for k in paths)
          + f"{'tok/s':>10}{'metadata':>10}{'issue':>10}")
    for r in rows:
        print(f"{r['seqs']:>8}{r['tokens']:>8}{r['gflop']:>8.0f}{r['roofline_ms']:>8.2f}ms"
              + "".join(f"{r[k + '_ms']:>12.2f}ms{r['roofline_ms'] / r[k + '_ms'] * 100:>5.0f}%" for k in paths)
              + f"{r['tokens'] / r['cuda_experts_ms'] * 1e3:>10.0f}{r['metadata_ms']:>8.2f}ms{r['issue_ms']:>8.2f}ms")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "bf16_flops": rate, "args": vars(a), "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
