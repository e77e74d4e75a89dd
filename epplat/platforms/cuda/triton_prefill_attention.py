"""Prefill attention for all the prefill chunks of a step in one launch, over the paged KV cache (Triton).

The portable path (epplat.core.model.attention) runs one SDPA call a chunk, and a chunk with a cached
prefix first gathers its whole context out of the cache (two ``index_select`` copies) and builds a
[q_len, context_len] mask: a served mixed step of 8 chunks cost ~30 launches and copies of every context
before the attention itself. This kernel reads the keys and values where they lie: each program takes one
tile of BM query tokens of one chunk and one query head, walks the chunk's block table BN keys at a time
(a tile may span several pages), and keeps flash attention's running softmax in float32. Tiles wholly
below the tile's first query position run without a mask; only the diagonal tiles are masked (causal
within the chunk, every cached key visible). The chunk descriptors come from the step's metadata
(``meta.prefill_desc``: q_start, q_len, context_len, table offset), so nothing is built per chunk. The
query tiles of a chunk run longest first (the causal tail is the longest). The step's keys must already be
in the cache (the KV write runs before, or the fused rope kernel wrote them).

A step whose chunks all start fresh (nothing cached before them) is left to the portable path: there each
chunk attends its own contiguous keys through torch's SDPA (cuDNN's Hopper flash kernel), which on the H200
took 0.094 ms for one layer of a 2048-token prompt against this kernel's 0.167; with cached prefixes this
kernel was 1.22-1.29x faster (docs/benchmarks.md, "prefill attention").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epplat.platforms.cuda.launch import cached
from epplat.platforms.cuda.triton_attention import online_softmax_step

# (BM query tokens, BN keys a step, warps, stages) by dtype; benchmarks/prefill_attention_bench.py sweeps them
# (H200, bf16, 32 / 4 heads of 128: 128-128-8-2 the fastest of the eight tiles timed with cached prefixes)
TILES = {torch.bfloat16: (128, 128, 8, 2), torch.float16: (128, 128, 8, 2), torch.float32: (32, 32, 4, 1)}


@triton.jit
def _attend(q, k_ptr, v_ptr, tables_ptr, toff, n0, kvh, qpos, ctx, scale, m, l_sum, acc,
            KVH: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr,
            IEEE: tl.constexpr):
    """One tile of BN keys from n0 against the query tile q [BM, D]: the running softmax after it."""
    n = n0 + tl.arange(0, BN)
    d = tl.arange(0, D)
    inside = n < ctx
    blk = tl.load(tables_ptr + toff + n // BS, mask=inside, other=0)
    addr = (blk * BS + n % BS)[:, None] * (KVH * D) + kvh * D + d[None, :]
    if MASK:
        k = tl.load(k_ptr + addr, mask=inside[:, None], other=0.0)
        v = tl.load(v_ptr + addr, mask=inside[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + addr)
        v = tl.load(v_ptr + addr)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    if MASK:
        s = tl.where((n[None, :] <= qpos[:, None]) & inside[None, :], s, float("-inf"))
    return online_softmax_step(s, v, m, l_sum, acc, IEEE)


@cached
@triton.jit(do_not_specialize=["q_stride", "o_stride", "m_tiles"])
def _prefill_kernel(q_ptr, k_ptr, v_ptr, desc_ptr, tables_ptr, o_ptr, scale, q_stride, o_stride, m_tiles,
                    KVH: tl.constexpr, GROUP: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, IEEE: tl.constexpr):
    mt = m_tiles - 1 - tl.program_id(0)         # the longest (last) query tiles first
    c = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(desc_ptr + c * 4)
    q_len = tl.load(desc_ptr + c * 4 + 1)
    ctx = tl.load(desc_ptr + c * 4 + 2)
    toff = tl.load(desc_ptr + c * 4 + 3)
    if mt * BM < q_len:
        prefix = ctx - q_len
        rows = mt * BM + tl.arange(0, BM)
        inside = rows < q_len
        qpos = prefix + rows
        d = tl.arange(0, D)
        tok = (q_start + rows).to(tl.int64)
        q = tl.load(q_ptr + tok[:, None] * q_stride + h * D + d[None, :], mask=inside[:, None], other=0.0)
        kvh = h // GROUP
        m = tl.full([BM], float("-inf"), tl.float32)
        l_sum = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        first = prefix + mt * BM          # the tile's first query position: keys up to it are seen by every row
        full = (first + 1) // BN * BN
        for n0 in range(0, full, BN):
            m, l_sum, acc = _attend(q, k_ptr, v_ptr, tables_ptr, toff, n0, kvh, qpos, ctx, scale, m, l_sum, acc,
                                    KVH, BS, D, BN, False, IEEE)
        for n0 in range(full, tl.minimum(ctx, first + BM), BN):
            m, l_sum, acc = _attend(q, k_ptr, v_ptr, tables_ptr, toff, n0, kvh, qpos, ctx, scale, m, l_sum, acc,
                                    KVH, BS, D, BN, True, IEEE)
        o = acc / l_sum[:, None]
        tl.store(o_ptr + tok[:, None] * o_stride + h * D + d[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=inside[:, None])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float,
                      out: torch.Tensor, tiles=None) -> bool:
    """Kernels.prefill_attention: q [T, H, D] (decodes first, then the prefill chunks of ``meta``), caches
    [num_blocks, block_size, KVH, D] holding this step's keys; writes out's prefill rows. False (the
    portable path runs) for shapes it does not take (head dim not a power of two in 16..256, caches not
    contiguous, mixed dtypes) and, unless ``tiles`` are given, for a step without a cached prefix."""
    t, h, d = q.shape
    kvh, bs = k_cache.shape[2], k_cache.shape[1]
    if (d & (d - 1) or not 16 <= d <= 256 or h % kvh or q.dtype not in TILES or k_cache.dtype != q.dtype
            or v_cache.dtype != q.dtype or not (k_cache.is_contiguous() and v_cache.is_contiguous())
            or out.stride(2) != 1 or out.stride(1) != d or meta.prefill_desc is None
            or (tiles is None and all(p.fresh for p in meta.prefills))):
        return False
    if q.stride(2) != 1 or q.stride(1) != d:
        q = q.contiguous()
    bm, bn, warps, stages = tiles or TILES[q.dtype]
    m_tiles = triton.cdiv(meta.max_prefill_len, bm)
    _prefill_kernel[(m_tiles, meta.prefill_desc.shape[0], h)](
        q, k_cache, v_cache, meta.prefill_desc, meta.prefill_tables, out, scale, q.stride(0), out.stride(0),
        m_tiles, kvh, h // kvh, bs, d, bm, bn, q.dtype == torch.float32, num_warps=warps, num_stages=stages)
    return True
