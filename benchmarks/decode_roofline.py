"""Decode step time on one GPU against the HBM roofline, eager and with CUDA graphs.

Builds a random-weight MoE (default: shaped like Qwen3-30B-A3B: 48 layers, hidden 2048,
32 query / 4 KV heads of 128, 128 experts top-8, expert width 768, vocab 151936, bf16)
directly on the GPU, fills a paged KV cache so every sequence has CONTEXT tokens, and
times one decode step (model forward + logits) per batch size. The roofline is the
bytes a step must read — every non-expert weight, the experts the batch routes to
(their expected count under uniform routing), and the KV cache of the batch — over
the device-to-device copy bandwidth measured in the same run.

    python benchmarks/decode_roofline.py --batch 1 16 64 256 --context 512 --compare-torch
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from epplat.core.model.attention import build_attn_metadata
from epplat.core.model.decoder import DecoderConfig, MoEForCausalLM
from epplat.core.moe.all2all import ExpertMap
from epplat.core.moe.all2all_torch import AllGatherReduceScatter
from epplat.platforms.cuda.graphs import CudaGraphRunner
from epplat.platforms.cuda.kernels import half_experts
from epplat.platforms.cuda.platform import CudaPlatform


def copy_bandwidth(dev) -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 20 / (time.perf_counter() - t)   # bytes read + written per second


def build_model(a, dev, dtype, max_position: int) -> MoEForCausalLM:
    """A random-weight model of the shape in ``a`` on the GPU, with the cuda platform's kernels."""
    cfg = DecoderConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                        num_kv_heads=a.kv_heads, head_dim=a.head_dim, max_position=max_position,
                        rope_theta=1e6, rms_norm_eps=1e-6, num_experts=a.experts, top_k=a.top_k,
                        moe_intermediate_size=a.moe_intermediate, intermediate_size=0, qk_norm=True)
    with torch.device(dev):
        model = MoEForCausalLM(cfg, AllGatherReduceScatter(ExpertMap(a.experts), device=dev), dtype,
                               kernels=CudaPlatform().kernels)
    g = torch.Generator(device=dev).manual_seed(0)
    for prm in model.parameters():
        prm.data.normal_(0, 0.02, generator=g) if prm.dim() > 1 else prm.data.fill_(1.0)
    return model


def set_kernels(model, kernels) -> None:
    """Point every layer of a built model at another Kernels record (to time one path against another)."""
    for m in model.modules():
        if "kernels" in vars(m):
            m.kernels = kernels


def model_args(p: argparse.ArgumentParser) -> None:
    """The model-shape flags (Qwen3-30B-A3B by default)."""
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--moe-intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=151936)


def timed(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def step_times(model, runner, a, dev, nblocks, blocks_per_seq, profile_at) -> dict:
    """batch -> (eager seconds, CUDA graph seconds) of one decode step with logits."""
    out = {}
    for b in a.batch:
        seqs = [(a.context + 1, 1, list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))) for i in range(b)]
        meta = build_attn_metadata(seqs, a.block_size, dev, nblocks, model.kernels)
        ids = torch.randint(0, a.vocab, (b,), device=dev)
        pos = torch.full((b,), a.context, device=dev)
        with torch.inference_mode():
            eager = timed(lambda: model.compute_logits(model(ids, pos, meta)))
            if b in profile_at:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    model.compute_logits(model(ids, pos, meta))
                    torch.cuda.synchronize()
                events = prof.key_averages()
                kernels = sum(e.count for e in events if str(getattr(e, "device_type", "")).endswith("CUDA"))
                print(f"batch {b}, eager step, {kernels} GPU kernels ({kernels / a.layers:.1f} a layer), "
                      f"{model.layers[0].kernels.decoder_layer is not None and 'fused decode layer' or 'modules'}, "
                      "GPU time by kernel:")
                print(events.table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
            graph = timed(lambda: model.compute_logits(runner.forward(ids, pos, meta)))
        out[b] = (eager, graph)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_args(p)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--profile", type=int, nargs="*", default=[], help="print the top GPU kernels of an eager step "
                                                                        "at these batch sizes")
    p.add_argument("--compare-torch", action="store_true", help="also time the step with the torch-op norm, rotary, "
                                                                  "routing and grouped-GEMM experts, in the same run")
    p.add_argument("--compare-modules", action="store_true", help="also time the step with the layer run module by "
                                                                    "module (no fused cuda decode layer), same run")
    p.add_argument("--compare-pdl", action="store_true", help="also time the step with the fused layer's Triton "
                   "kernels launched as programmatic dependents (epplat.platforms.cuda.pdl), same run, and compare "
                   "its logits with the step's")
    p.add_argument("--fp8", action="store_true", help="MoE experts in fp8 with 128x128 block scales (as "
                                                      "--quantization fp8); the roofline counts their bytes as 1 + scales")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev, dtype = torch.device("cuda", 0), torch.bfloat16
    model = build_model(a, dev, dtype, a.context + 64)
    bmax = max(a.batch)
    blocks_per_seq = -(-(a.context + 1) // a.block_size)
    nblocks = bmax * blocks_per_seq
    for layer in model.layers:
        shape = (nblocks + 2, a.block_size, a.kv_heads, a.head_dim)
        layer.self_attn.kv_cache = (torch.randn(shape, device=dev, dtype=dtype) * 0.1,
                                    torch.randn(shape, device=dev, dtype=dtype) * 0.1)
    if a.fp8:
        from epplat.platforms.cuda.fp8 import Fp8BlockQuant
        from epplat.platforms.cuda.fp8_moe import quantize
        for layer in model.layers:
            q13, s13 = quantize(layer.mlp.w13.data)
            q2, s2 = quantize(layer.mlp.w2.data)
            Fp8BlockQuant._swap(layer.mlp, q13, q2, s13, s2)
        torch.cuda.empty_cache()
    bw = copy_bandwidth(dev)
    elt = 2
    # every non-expert weight, except the embedding table: a step reads only its batch's rows of it
    dense = sum(p.numel() for n, p in model.named_parameters() if ".mlp.w" not in n and n != "embed_tokens") * elt
    per_expert = 3 * a.hidden * a.moe_intermediate * ((1 + 4 / 128 ** 2) if a.fp8 else elt)
    runner = CudaGraphRunner(model, dev)
    runner.capture(a.batch, blocks_per_seq, nblocks, (nblocks + 1) * a.block_size)
    times = step_times(model, runner, a, dev, nblocks, blocks_per_seq, a.profile)
    pdl_times = None
    if a.compare_pdl:
        from epplat.platforms.cuda import pdl
        seqs = [(a.context + 1, 1, list(range(blocks_per_seq)))]
        meta = build_attn_metadata(seqs, a.block_size, dev, nblocks, model.kernels)
        ids, pos = torch.randint(0, a.vocab, (1,), device=dev), torch.full((1,), a.context, device=dev)
        with torch.inference_mode():
            serial = model.compute_logits(runner.forward(ids, pos, meta)).float()
        runner = None
        torch.cuda.empty_cache()
        pdl.ENABLED = True
        try:
            runner = CudaGraphRunner(model, dev)
            runner.capture(a.batch, blocks_per_seq, nblocks, (nblocks + 1) * a.block_size)
            with torch.inference_mode():
                dependent = model.compute_logits(runner.forward(ids, pos, meta)).float()
            print(f"PDL against serial launches, batch 1 logits (graphs): max diff "
                  f"{(dependent - serial).abs().max():.3e}, same argmax "
                  f"{bool((dependent.argmax(-1) == serial.argmax(-1)).all())}")
            pdl_times = step_times(model, runner, a, dev, nblocks, blocks_per_seq, [])
        except Exception as e:  # noqa: BLE001 - report, and keep the other columns of the run
            print(f"PDL step failed: {type(e).__name__}: {e}")
        pdl.ENABLED = False
    if a.compare_torch:
        del runner
        torch.cuda.empty_cache()
        # torch's norm, rotary, routing and grouped-GEMM experts; the Triton attention stays
        set_kernels(model, dataclasses.replace(CudaPlatform().kernels, rms_norm=None, rope=None, route=None,
                                               experts=half_experts, decoder_layer=None))
        runner = CudaGraphRunner(model, dev)
        runner.capture(a.batch, blocks_per_seq, nblocks, (nblocks + 1) * a.block_size)
        torch_times = step_times(model, runner, a, dev, nblocks, blocks_per_seq, [])
    if a.compare_modules:
        del runner
        torch.cuda.empty_cache()
        set_kernels(model, dataclasses.replace(CudaPlatform().kernels, decoder_layer=None))
        runner = CudaGraphRunner(model, dev)
        runner.capture(a.batch, blocks_per_seq, nblocks, (nblocks + 1) * a.block_size)
        module_times = step_times(model, runner, a, dev, nblocks, blocks_per_seq, a.profile)
    rows = []
    for b in a.batch:
        eager, graph = times[b]
        hit = a.experts * (1 - (1 - a.top_k / a.experts) ** b)          # expected experts used per layer
        kv = b * (a.context + 1) * a.layers * 2 * a.kv_heads * a.head_dim * elt
        need = dense + b * a.hidden * elt + a.layers * hit * per_expert + kv
        roof = need / bw
        row = {"batch": b, "eager_ms": eager * 1e3, "graph_ms": graph * 1e3, "roofline_ms": roof * 1e3,
               "bytes": need, "graph_frac_of_roofline": roof / graph, "eager_frac_of_roofline": roof / eager}
        if pdl_times:
            row["pdl_eager_ms"], row["pdl_graph_ms"] = (v * 1e3 for v in pdl_times[b])
        if a.compare_modules:
            row["modules_eager_ms"], row["modules_graph_ms"] = (v * 1e3 for v in module_times[b])
        if a.compare_torch:
            row["torch_ops_eager_ms"], row["torch_ops_graph_ms"] = (v * 1e3 for v in torch_times[b])
        rows.append(row)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s (read+write); "
          f"{a.layers} layers, {a.experts} experts top-{a.top_k}, context {a.context}, bf16"
          + (", experts fp8 (128x128 blocks)" if a.fp8 else ""))
    print(f"{'batch':>6}{'GB read':>9}{'roofline':>10}{'eager':>10}{'graphs':>10}{'graphs/roof':>13}"
          + (f"{'PDL graphs':>12}{'/roof':>7}" if pdl_times else "")
          + (f"{'modules graphs':>16}{'/roof':>7}" if a.compare_modules else "")
          + (f"{'torch-ops graphs':>18}{'/roof':>7}{'speedup':>9}" if a.compare_torch else ""))
    for r in rows:
        print(f"{r['batch']:>6}{r['bytes'] / 1e9:>9.2f}{r['roofline_ms']:>8.2f}ms{r['eager_ms']:>8.2f}ms"
              f"{r['graph_ms']:>8.2f}ms{r['graph_frac_of_roofline'] * 100:>12.0f}%"
              + (f"{r['pdl_graph_ms']:>10.2f}ms{r['roofline_ms'] / r['pdl_graph_ms'] * 100:>6.0f}%"
                 if pdl_times else "")
              + (f"{r['modules_graph_ms']:>14.2f}ms{r['roofline_ms'] / r['modules_graph_ms'] * 100:>6.0f}%"
                 if a.compare_modules else "")
              + (f"{r['torch_ops_graph_ms']:>16.2f}ms{r['roofline_ms'] / r['torch_ops_graph_ms'] * 100:>6.0f}%"
                 f"{r['torch_ops_graph_ms'] / r['graph_ms']:>8.2f}x" if a.compare_torch else ""))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "copy_bw": bw, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
