"""Prefill attention of one layer on a GPU: the one-launch Triton kernel over the paged cache against SDPA per chunk.

For the Qwen3-30B-A3B attention shape (32 query heads, 4 KV heads of 128, bf16, 16-token pages), with the
step's keys already in the cache (as both paths run it inside a layer): the cuda platform's
``triton_prefill_attention`` (all chunks in one launch, reading keys where they lie) at its default tiles
and others, against the portable path (``epplat.core.model.attention``: one SDPA call a chunk, cuDNN or
FlashAttention inside torch, after gathering a cached prefix out of the cache and building its mask). Steps:
one and four fresh 2048-token prompts, a served mixed step (8 chunks of 2048 tokens, half of them after a
1024-token cached prefix, beside 64 decodes), and one 2048-token chunk after 14,336 cached tokens (a long
prompt's last chunk). Medians of triton.testing.do_bench, ms; TFLOP/s counts QK^T and PV over the keys each
query sees.

    python benchmarks/prefill_attention_bench.py --out prefill_attention.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
import triton

from epplat.core.model.attention import build_attn_metadata, paged_attention
from epplat.platforms.cuda.kernels import cuda_kernels
from epplat.platforms.cuda.triton_prefill_attention import TILES, prefill_attention

STEPS = {   # name: [(context_len, q_len)], decodes first
    "1 x 2048": [(2048, 2048)],
    "4 x 2048": [(2048, 2048)] * 4,
    "mixed: 64 decodes + 8 x 2048 (4 after 1024 cached)": [(512, 1)] * 64 + [(2048, 2048), (3072, 2048)] * 4,
    "2048 after 14336 cached": [(16384, 2048)],
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--tiles", nargs="*", default=["128-64-8-2", "64-64-4-2", "64-128-4-2"],
                   help="BM-BN-warps-stages tiles to time besides the default")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev, dt, bs = torch.device("cuda", 0), torch.bfloat16, a.block_size
    h, kvh, d = a.heads, a.kv_heads, a.head_dim
    cuda = cuda_kernels()
    portable = dataclasses.replace(cuda, prefill_attention=None)
    tiles = [TILES[dt]] + [tuple(int(x) for x in t.split("-")) for t in a.tiles]
    rows = []
    print(f"{torch.cuda.get_device_name()}: prefill attention of one layer, {h} / {kvh} heads of {d}, bf16, ms")
    print(f"{'step':<52}{'SDPA per chunk':>16}" + "".join(f"{'-'.join(map(str, t)):>14}" for t in tiles)
          + f"{'best/SDPA':>11}")
    for name, seqs in STEPS.items():
        nblocks = sum(-(-c // bs) for c, _ in seqs)
        spec, at = [], 0
        for c, q in seqs:
            n = -(-c // bs)
            spec.append((c, q, list(range(at, at + n))))
            at += n
        shape = (nblocks + 1, bs, kvh, d)
        kc, vc = torch.randn(shape, device=dev, dtype=dt), torch.randn(shape, device=dev, dtype=dt)
        t = sum(ql for _, ql in seqs)
        q = torch.randn(t, h, d, device=dev, dtype=dt)
        k, v = torch.randn(t, kvh, d, device=dev, dtype=dt), torch.randn(t, kvh, d, device=dev, dtype=dt)
        meta = build_attn_metadata(spec, bs, dev, nblocks, cuda)
        flops = sum(4 * h * d * (c - ql + (ql + 1) / 2) * ql for c, ql in seqs if ql > 1)
        paged_attention(q, k, v, (kc, vc), meta, d ** -0.5, cuda)      # the keys into the cache, once
        ref = paged_attention(q, k, v, (kc, vc), meta, d ** -0.5, portable, written=True)
        row = {"step": name, "gflop": flops / 1e9,
               "sdpa_ms": triton.testing.do_bench(
                   lambda: paged_attention(q, k, v, (kc, vc), meta, d ** -0.5, portable, written=True),
                   warmup=50, rep=300, return_mode="median")}
        b = meta.num_decodes
        for tl_ in tiles:
            out = torch.empty_like(q)
            prefill_attention(q, kc, vc, meta, d ** -0.5, out, tiles=tl_)
            err = float((out[b:].float() - ref[b:].float()).abs().max())
            row["-".join(map(str, tl_))] = {
                "ms": triton.testing.do_bench(lambda: prefill_attention(q, kc, vc, meta, d ** -0.5, out, tiles=tl_),
                                              warmup=50, rep=300, return_mode="median"), "max_abs_diff": err}
        best = min(row[k]["ms"] for k in row if isinstance(row[k], dict))
        print(f"{name:<52}{row['sdpa_ms']:>8.3f} {flops / row['sdpa_ms'] / 1e9:>4.0f}TF"
              + "".join(f"{row[k]['ms']:>7.3f} {flops / row[k]['ms'] / 1e9:>4.0f}TF"
                        for k in row if isinstance(row[k], dict))
              + f"{row['sdpa_ms'] / best:>10.2f}x")
        print("    max |diff| against SDPA: " + ", ".join(f"{k} {row[k]['max_abs_diff']:.4f}"
                                                      for k in row if isinstance(row[k], dict)))
        rows.append(row)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
