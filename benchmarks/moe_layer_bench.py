"""One MoE layer's experts on one GPU: the Triton kernels against torch._grouped_mm, and both
against the roofline, at decode- and prefill-sized batches.

Shape of Qwen3-30B-A3B by default (hidden 2048, 128 experts top-8, expert width 768, bf16).
Routing is uniform random top-k. Each timed call runs LAYERS distinct layers' weights in
turn (several GB, far over L2), captured in one CUDA graph; the figure is per layer.
Roofline: max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), both measured in the same
run; bytes = the routed experts' weights (expected count under uniform routing) + tokens
in and out. Also checks each path against a float32 reference on fresh inputs.

    python benchmarks/moe_layer_bench.py --tokens 1 16 64 256 1024 4096 --out moe.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton

from epplat.core.moe.experts import capturable_experts
from epplat.platforms.cuda import fp8_moe, triton_moe, triton_moe_sorted


def ceilings(dev) -> tuple[float, float]:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    bw = 2 * a.numel() / (triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median") * 1e-3)
    del a, b
    n = 8192
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    flops = 2 * n ** 3 / (triton.testing.do_bench(lambda: x @ y, warmup=50, rep=300, return_mode="median") * 1e-3)
    return bw, flops


def graph_time(fn, sets) -> float:
    """Median ms of one call, over replays of a graph that calls fn once per input set."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for args in sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for args in sets:
            fn(*args)
    return triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median") / len(sets)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--moe-intermediate", type=int, default=768)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096, 16384])
    p.add_argument("--layers", type=int, default=4, help="weight sets rotated through (defeats L2)")
    p.add_argument("--tiles", nargs="*", default=["16-64-64-64-64-6-4", "16-128-64-128-64-4-4", "16-64-256-64-128-3-4",
                                                   "16-32-128-32-128-4-4", "16-64-128-128-128-4-8"],
                   help="Triton tile configurations also tried at decode sizes (bm-bn1-bk1-bn2-bk2-stages-warps)")
    p.add_argument("--fp8-tiles", nargs="*", default=["16-64-128-64-128-4-4", "16-128-128-128-128-4-4",
                                                       "16-64-64-64-64-6-4", "16-128-128-128-128-2-4"],
                   help="tiles tried for fp8 weights up to 256 tokens, in the masked kernels to 128 tokens and the "
                        "sorted ones above (bm-bn1-bk1-bn2-bk2-stages-warps)")
    p.add_argument("--sorted-tiles", nargs="*", default=[
        "64-64-64-128-64-4-4", "128-64-64-128-64-3-8", "128-128-64-128-64-3-8", "64-128-64-128-64-3-4",
        "128-64-64-64-64-4-4", "64-64-128-64-128-3-4", "32-64-64-64-64-4-4", "16-64-64-64-64-4-4"],
        help="tiles of the expert-sorted Triton grouped GEMM tried from 64 tokens (bm-bn1-bk1-bn2-bk2-stages-warps)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev, dt = torch.device("cuda", 0), torch.bfloat16
    torch.manual_seed(0)
    bw, flops = ceilings(dev)
    e, h, i, k = a.experts, a.hidden, a.moe_intermediate, a.top_k
    w13s = [torch.randn(e, h, 2 * i, device=dev, dtype=dt) / h ** 0.5 for _ in range(a.layers)]
    w2s = [torch.randn(e, i, h, device=dev, dtype=dt) / i ** 0.5 for _ in range(a.layers)]
    tiles = [triton_moe.Tiles.parse(t) for t in a.tiles]
    fp8 = [fp8_moe.quantize(w13) + fp8_moe.quantize(w2) for w13, w2 in zip(w13s, w2s)]   # (q13, s13, q2, s2)
    rows = []
    for t in a.tokens:
        x = torch.randn(t, h, device=dev, dtype=dt)
        ids = torch.rand(t, e, device=dev).topk(k, dim=-1).indices
        w = torch.softmax(torch.randn(t, k, device=dev), -1).to(dt)
        sets = [(x, ids, w, w13s[j], w2s[j]) for j in range(a.layers)]
        # correctness on this shape: both paths against float32 on the first weight set
        grouped = capturable_experts(x, ids, w, w13s[0], w2s[0], F.silu).float()
        ref = _fp32_reference(x, ids, w, w13s[0], w2s[0])
        row = {"tokens": t, "grouped_rel_err": _rel(grouped, ref)}
        row["grouped_ms"] = graph_time(lambda *s: capturable_experts(*s, F.silu), sets)
        if t * k <= 2 * triton_moe.MAX_ASSIGNMENTS:
            out = triton_moe.triton_experts(x, ids, w, w13s[0], w2s[0], F.silu)
            row["triton_rel_err"] = _rel(out.float(), ref)
            row["triton_ms"] = graph_time(lambda *s: triton_moe.triton_experts(*s, F.silu), sets)
            for c in tiles:
                row[f"triton_{c}_ms"] = graph_time(lambda *s, c=c: triton_moe.triton_experts(*s, F.silu, tiles=c), sets)
        # fp8 weights against the bf16 kernels the platform runs at this size (masked, or sorted above)
        row["bf16_ms"] = graph_time(lambda *s: triton_moe_sorted.cuda_experts(*s, F.silu), sets)
        fsets = [(x, ids, w, q13, q2, s13, s2) for q13, s13, q2, s2 in fp8]
        run8 = lambda x, ids, w, q13, q2, s13, s2: fp8_moe.fp8_experts(   # noqa: E731
            x, ids, w, q13, q2, F.silu, w13_scale=s13, w2_scale=s2)
        row["fp8_rel_err"] = _rel(run8(*fsets[0]).float(), ref)
        row["fp8_ms"] = graph_time(run8, fsets)
        kern = triton_moe.triton_experts if t * k <= triton_moe.MAX_ASSIGNMENTS else triton_moe_sorted.sorted_experts
        for c in a.fp8_tiles if t <= 256 else []:
            row[f"fp8_{c}_ms"] = graph_time(
                lambda x, ids, w, q13, q2, s13, s2, tc=triton_moe.Tiles.parse(c): kern(
                    x, ids, w, q13, q2, F.silu, tiles=tc, w13_scale=s13, w2_scale=s2), fsets)
        if t >= 64:
            out = triton_moe_sorted.sorted_experts(x, ids, w, w13s[0], w2s[0], F.silu)
            row["sorted_rel_err"] = _rel(out.float(), ref)
            row["sorted_ms"] = graph_time(lambda *s: triton_moe_sorted.sorted_experts(*s, F.silu), sets)
            for c in a.sorted_tiles:
                tc = triton_moe.Tiles.parse(c)
                row[f"sorted_{c}_ms"] = graph_time(
                    lambda *s, tc=tc: triton_moe_sorted.sorted_experts(*s, F.silu, tiles=tc), sets)
        hit = e * (1 - (1 - k / e) ** t)
        nbytes = hit * 3 * h * i * 2 + 2 * t * h * 2
        row["roofline_ms"] = max(nbytes / bw, 2 * t * k * 3 * h * i / flops) * 1e3
        row["bytes"] = nbytes
        row["fp8_roofline_ms"] = (hit * 3 * h * i * (1 + 2 / 128 ** 2) + 2 * t * h * 2) / bw * 1e3
        rows.append(row)
        del x, ids, w, sets
    name = torch.cuda.get_device_name()
    print(f"{name}: copy {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {flops / 1e12:.0f} TFLOP/s; "
          f"experts {e} top-{k}, hidden {h}, width {i}; ms per layer (median of graph replays)")
    print(f"{'tokens':>7}{'roofline':>10}{'grouped_mm':>12}{'triton':>10}{'triton/roof':>13}{'grouped/roof':>14}"
          f"{'speedup':>9}   best tiles")
    fp8_rows = [r for r in rows if "fp8_ms" in r]
    for r in rows:
        tri = r.get("triton_ms")
        sweep = {c: r[f"triton_{c}_ms"] for c in tiles if f"triton_{c}_ms" in r}
        best = min(sweep, key=sweep.get) if sweep else None
        print(f"{r['tokens']:>7}{r['roofline_ms']:>10.4f}{r['grouped_ms']:>12.4f}"
              + (f"{tri:>10.4f}{r['roofline_ms'] / tri * 100:>12.0f}%" if tri else f"{'-':>10}{'-':>13}")
              + f"{r['roofline_ms'] / r['grouped_ms'] * 100:>13.0f}%"
              + (f"{r['grouped_ms'] / tri:>8.2f}x" if tri else "") + (f"   {best} {sweep[best]:.4f}" if best else ""))
    print(f"fp8 experts (weights 1 byte + block scales): {'tokens':>6}{'fp8 roofline':>14}{'bf16':>9}{'fp8':>9}"
          f"{'/roof':>7}{'fp8 speedup':>13}")
    for r in fp8_rows:
        sweep = {kk: v for kk, v in r.items() if kk.startswith("fp8_") and kk.count("-") == 6}
        best = min(sweep, key=sweep.get) if sweep else None
        print(f"{'':>45}{r['tokens']:>6}{r['fp8_roofline_ms']:>14.4f}{r['bf16_ms']:>9.4f}{r['fp8_ms']:>9.4f}"
              f"{r['fp8_roofline_ms'] / r['fp8_ms'] * 100:>6.0f}%{r['bf16_ms'] / r['fp8_ms']:>12.2f}x"
              + (f"   best {best} {sweep[best]:.4f}" if best else ""))
    print(f"expert-sorted Triton grouped GEMM (triton_moe_sorted): {'tokens':>6}{'roofline':>10}{'grouped_mm':>12}"
          f"{'sorted':>9}{'/roof':>7}{'vs grouped':>12}   best tiles")
    for r in rows:
        if "sorted_ms" not in r:
            continue
        sweep = {c: r[f"sorted_{c}_ms"] for c in a.sorted_tiles}
        best = min(sweep, key=sweep.get) if sweep else None
        print(f"{'':>55}{r['tokens']:>6}{r['roofline_ms']:>10.4f}{r['grouped_ms']:>12.4f}{r['sorted_ms']:>9.4f}"
              f"{r['roofline_ms'] / r['sorted_ms'] * 100:>6.0f}%{r['grouped_ms'] / r['sorted_ms']:>11.2f}x   "
              + (f"{best} {sweep[best]:.4f}" if best else ""))
    errs = {k2: max(r[k2] for r in rows if k2 in r) for r0 in rows for k2 in r0 if k2.endswith("rel_err")}
    print("max relative error vs float32:", {k2: f"{v:.2e}" for k2, v in errs.items()})
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": name, "copy_bw": bw, "bf16_flops": flops, "args": vars(a), "rows": rows}, f, indent=2)



def _fp32_reference(x, ids, w, w13, w2):
    """sum_k w * (silu(x W1) * (x W3)) W2 in float32, one expert at a time."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xf, inter = x.float(), w2.shape[1]
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        g = xf[tok] @ w13[e].float()
        hdn = F.silu(g[:, :inter]) * g[:, inter:]
        out.index_add_(0, tok, (hdn @ w2[e].float()) * w[tok, slot].float()[:, None])
    return out


def _rel(out, ref) -> float:
    return float((out - ref).norm() / ref.norm())


if __name__ == "__main__":
    main()
