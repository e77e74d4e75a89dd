"""The small-batch decode kernels one by one on a GPU: each against what it replaces, in the same run.

For the Qwen3-30B-A3B layer shape (hidden 2048, 32 / 4 heads of 128, 128 experts): the Triton GEMV
(triton_gemv) against cuBLAS (F.linear) on the qkv, o_proj and router weights at 1-4 rows; decode
attention at batch 1 and 16 over 512 / 4096 cached tokens in 16-token pages, the defaults (64-token tiles,
slices of at least 128 tokens, the merge 4 slices at a time) against other tiles, slice sizes and a merge of
one slice at a time, among them 16-token tiles and 16-token slices (what the kernel did before: 32 slices of
one page at batch 1); the masked expert kernels at 1 and 4 tokens in their tiles and narrower ones; the
residual add + RMSNorm launch against torch's add and the RMSNorm kernel. Times are medians of CUDA-graph
replays, each graph running the kernel once per copy of its inputs, the copies together larger than L2 (as
in a step, where each layer's weights are cold), in us per call; GB/s counts the bytes a call must read.

    python benchmarks/decode_kernels.py --out decode_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from moe_layer_bench import graph_time  # noqa: E402

from epplat.platforms.cuda import triton_attention, triton_gemv, triton_moe, triton_norm  # noqa: E402

_COLD = 256 << 20          # bytes of input copies a graph cycles through (H200 L2: 50 MB)


def copies(make, nbytes: int) -> list:
    return [make() for _ in range(max(2, -(-_COLD // max(1, nbytes))))]


def gemv_rows(dev, dt) -> list:
    rows = []
    for name, n, k in (("qkv", 5120, 2048), ("o_proj", 2048, 4096), ("router", 128, 2048)):
        for m in (1, 2, 4):
            sets = copies(lambda: (torch.randn(m, k, device=dev, dtype=dt), torch.randn(n, k, device=dev, dtype=dt)
                                   / k ** 0.5), n * k * 2)
            x, w = sets[0]
            ref = F.linear(x.float(), w.float())
            err = float((triton_gemv.gemv(x, w).float() - ref).norm() / ref.norm())
            cublas = graph_time(lambda x, w: F.linear(x, w), sets) * 1e3
            triton = graph_time(lambda x, w: triton_gemv.gemv(x, w), sets) * 1e3
            rows.append({"kernel": f"{name} {m}x{k} @ {k}x{n}", "bytes": n * k * 2, "cublas_us": cublas,
                         "triton_us": triton, "triton_rel_err": err,
                         "tiles": triton_gemv.tiles(n, k, triton_gemv._sms(dev), m)})
    return rows


def attention_rows(dev, dt) -> list:
    rows = []
    kvh, h, d, page = 4, 32, 128, 16
    variants = [(0, triton_attention.MIN_SPLIT_TOKENS, 0), (0, triton_attention.MIN_SPLIT_TOKENS, 1), (16, 16, 0),
                (32, 64, 0), (64, 64, 0), (64, 256, 0), (64, 512, 0)]
    for b, ctx in ((1, 512), (1, 4096), (16, 512), (16, 4096)):
        per = -(-ctx // page)
        nbytes = b * ctx * kvh * d * 2 * 2

        def make():
            cache = torch.randn(b * per + 1, page, kvh, d, device=dev, dtype=dt)
            return (torch.randn(b, h, d, device=dev, dtype=dt), cache, torch.randn_like(cache),
                    torch.randperm(b * per, device=dev).view(b, per).int(),
                    torch.full((b,), ctx, device=dev, dtype=torch.int32))
        sets = copies(make, nbytes)
        row = {"kernel": f"attention batch {b}, {ctx} tokens", "bytes": nbytes}
        q, k, v, tables, lens = sets[0]
        base = triton_attention.decode_attention(q, k, v, tables, lens, d ** -0.5).float()
        for tile, min_tokens, merge in variants:
            key = f"tile{tile or 'default'}_min{min_tokens}_merge{merge or 'default'}"
            out = triton_attention.decode_attention(q, k, v, tables, lens, d ** -0.5, tile=tile,
                                                    min_tokens=min_tokens, merge=merge).float()
            row[key + "_maxdiff"] = float((out - base).abs().max())
            row[key + "_us"] = graph_time(
                lambda q, k, v, t, n, tile=tile, mt=min_tokens, mg=merge: triton_attention.decode_attention(
                    q, k, v, t, n, d ** -0.5, tile=tile, min_tokens=mt, merge=mg), sets) * 1e3
        rows.append(row)
    return rows


def expert_rows(dev, dt) -> list:
    """The masked expert kernels at 1 and 4 tokens (Qwen3-30B-A3B's 128 experts top-8, width 768) in their
    default tiles and narrower ones (more programs for the few experts a batch routes to)."""
    rows = []
    e, hid, inter, top = 128, 2048, 768, 8
    for t in (1, 4):
        def make():
            return (torch.randn(t, hid, device=dev, dtype=dt), torch.rand(t, e, device=dev).topk(top, -1).indices,
                    torch.softmax(torch.randn(t, top, device=dev), -1).to(dt),
                    torch.randn(e, hid, 2 * inter, device=dev, dtype=dt) / hid ** 0.5,
                    torch.randn(e, inter, hid, device=dev, dtype=dt) / inter ** 0.5)
        sets = [make() for _ in range(3)]     # 1.2 GB each; a call reads ~75 MB of it (8 experts at batch 1)
        row = {"kernel": f"experts {t} tokens", "bytes": (1 - (1 - top / e) ** t) * e * 3 * hid * inter * 2}
        x, ids, w, w13, w2 = sets[0]
        base = triton_moe.triton_experts(x, ids, w, w13, w2, F.silu).float()
        for c in ("default", "16-32-64-32-64-6-4", "16-32-128-32-128-4-4", "16-16-128-16-128-4-4",
                  "16-32-64-64-64-6-4", "16-64-64-32-64-6-4"):
            tiles = None if c == "default" else triton_moe.Tiles.parse(c)
            out = triton_moe.triton_experts(x, ids, w, w13, w2, F.silu, tiles=tiles).float()
            row[c + "_maxdiff"] = float((out - base).abs().max())
            row[c + "_us"] = graph_time(lambda x, i, w, a, b, tc=tiles: triton_moe.triton_experts(
                x, i, w, a, b, F.silu, tiles=tc), sets) * 1e3
        rows.append(row)
    return rows


def norm_rows(dev, dt) -> list:
    rows = []
    for t in (1, 16):
        sets = copies(lambda: (torch.randn(t, 2048, device=dev, dtype=dt), torch.randn(t, 2048, device=dev, dtype=dt),
                               torch.rand(2048, device=dev, dtype=dt) + 0.5), 1 << 20)
        fused = graph_time(lambda x, a, w: triton_norm.add_rms_norm(x, a, w, 1e-6), sets) * 1e3
        apart = graph_time(lambda x, a, w: triton_norm.rms_norm(x + a, w, 1e-6), sets) * 1e3
        rows.append({"kernel": f"add + RMSNorm {t}x2048", "fused_us": fused, "add_then_norm_us": apart})
    return rows


def guarded(fn, dev, dt) -> list:
    """fn's rows, or none (with the error printed) so that one failing part leaves the others' figures."""
    try:
        return fn(dev, dt)
    except Exception as e:  # noqa: BLE001 - a benchmark: report and go on
        print(f"{fn.__name__} failed: {type(e).__name__}: {e}")
        return []


def print_gemv(rows) -> None:
    print(f"{'GEMM':<28}{'MB':>7}{'cuBLAS':>9}{'GB/s':>7}{'Triton':>9}{'GB/s':>7}  (BN, BK)  rel err")
    for r in rows:
        mb = r["bytes"] / 1e6
        print(f"{r['kernel']:<28}{mb:>7.2f}{r['cublas_us']:>9.2f}{mb / r['cublas_us'] * 1e3:>7.0f}"
              f"{r['triton_us']:>9.2f}{mb / r['triton_us'] * 1e3:>7.0f}  {r['tiles']}  {r['triton_rel_err']:.1e}")


def print_variants(rows) -> None:
    for r in rows:
        times = {k[:-3]: v for k, v in r.items() if k.endswith("_us")}
        print(f"{r['kernel']} ({r['bytes'] / 1e6:.1f} MB): " + ", ".join(
            f"{k} {v:.2f} us (max diff {r[k + '_maxdiff']:.1e})" for k, v in times.items()), flush=True)


def print_norm(rows) -> None:
    for r in rows:
        print(f"{r['kernel']}: one launch {r['fused_us']:.2f} us, add then norm {r['add_then_norm_us']:.2f} us")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev, dt = torch.device("cuda", 0), torch.bfloat16
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}; us per call, median of CUDA-graph replays over cold copies", flush=True)
    out = {"device": torch.cuda.get_device_name()}
    for name, fn, show in (("gemv", gemv_rows, print_gemv), ("attention", attention_rows, print_variants),
                           ("norm", norm_rows, print_norm), ("experts", expert_rows, print_variants)):
        out[name] = guarded(fn, dev, dt)
        show(out[name])           # each part as it is done: a run cut short keeps the parts before
        if a.out:
            with open(a.out, "w") as f:
                json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
