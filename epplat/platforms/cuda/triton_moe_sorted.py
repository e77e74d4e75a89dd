"""Fused MoE for prefill-sized batches: a Triton grouped GEMM over (token, expert) pairs
sorted by expert, with the permutation fused into its loads and stores.

``triton_moe.py`` rescans the routing ids in every program, which costs nothing at decode
sizes and too much at thousands of tokens. Here the assignments are grouped by expert once,
on the device (no host sync, so CUDA graphs can capture it), each expert's run padded to a
whole tile of BM rows; then:

0. ``sort_by_expert``: three small kernels (count with atomics, pad and place the tiles, scatter);
1. ``_sorted_gate_up_kernel``: one program per (BM-row tile, output tile); the tile's rows
   gather their token rows of x straight from the unpermuted activations (no permuted
   copy), multiply by the tile's expert's gate and up columns, and store act(g) * u in
   sorted order;
2. ``_sorted_down_kernel``: those rows times the expert's down matrix, scaled by the
   routing weight, stored back at each assignment's own row (the unpermute is its store);
3. ``triton_moe._sum_kernel``: each token's sum over its k rows.

Tiles of experts nobody routed to are never launched past their first id load. Step-size
arguments are not specialised on (``do_not_specialize``): Triton would otherwise compile a
variant per divisibility of the token count, which the warm-up before serving cannot cover.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from epplat.platforms.cuda.launch import cached
from epplat.platforms.cuda.triton_moe import (_ACTS, MAX_ASSIGNMENTS, Tiles, _dequant, _gated_tile, _sum_kernel,
                                              triton_experts, weight_scales)


def _tiles(num_assign: int, experts: int, w8: bool = False) -> Tiles:
    """Tiles by rows per expert, from the sweep of benchmarks/moe_layer_bench.py on an H200 (hidden
    2048, width 768): narrow row tiles while experts get few rows (less padding), then 128-row
    tiles with 8 warps, gate/up 128 columns wide from 128 rows per expert, down 256 from 256.
    fp8 weights (half the bytes) take a 128-deep reduction step while the GEMMs are bound by weight
    bytes (few rows per expert)."""
    per_expert = num_assign / max(1, experts)
    if w8 and per_expert <= 32:
        return Tiles(16 if per_expert <= 8 else 64, 64, 128, 128, 128, 3, 4)
    if per_expert <= 32:
        return Tiles(16 if per_expert <= 8 else 64, 64, 64, 128, 64, 4, 4)
    if per_expert <= 128:
        return Tiles(128, 64, 64, 128, 64, 3, 8)
    return Tiles(128, 128, 64, 128 if per_expert <= 256 else 256, 64, 3, 8)


@triton.jit
def _tile_rows(rows_ptr, tile_expert_ptr, num_assign, BM: tl.constexpr):
    """(expert, positions, assignment rows, which rows are real) of this program's tile."""
    e = tl.load(tile_expert_ptr + tl.program_id(1))
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    rows = tl.load(rows_ptr + m)
    return e, m, rows, rows < num_assign


@cached
@triton.jit(do_not_specialize=["num_assign"])
def _sorted_gate_up_kernel(x_ptr, rows_ptr, tile_expert_ptr, w_ptr, s_ptr, h_ptr, num_assign, hidden, inter,
                           stride_we, stride_se, K: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr,
                           BN: tl.constexpr, BK: tl.constexpr, W8: tl.constexpr):
    e, m, rows, valid = _tile_rows(rows_ptr, tile_expert_ptr, num_assign, BM)
    if e < 0:
        return
    tok = (rows // K).to(tl.int64)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = n < inter
    h = _gated_tile(x_ptr, tok, valid, w_ptr + e.to(tl.int64) * stride_we, n, nmask, hidden, inter, ACT, False,
                    BM, BN, BK, s_ptr + e.to(tl.int64) * stride_se, W8)
    tl.store(h_ptr + m[:, None].to(tl.int64) * inter + n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=nmask[None, :])


@cached
@triton.jit(do_not_specialize=["num_assign"])
def _sorted_down_kernel(h_ptr, rows_ptr, tile_expert_ptr, tw_ptr, w_ptr, s_ptr, y_ptr, num_assign, hidden, inter,
                        stride_we, stride_se, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        W8: tl.constexpr):
    e, m, rows, valid = _tile_rows(rows_ptr, tile_expert_ptr, num_assign, BM)
    if e < 0:
        return
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = n < hidden
    w_base = w_ptr + e.to(tl.int64) * stride_we
    s_base = s_ptr + e.to(tl.int64) * stride_se
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, inter, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < inter
        ha = tl.load(h_ptr + m[:, None].to(tl.int64) * inter + kk[None, :], mask=kmask[None, :], other=0.0)
        w = tl.load(w_base + kk[:, None].to(tl.int64) * hidden + n[None, :], mask=kmask[:, None] & nmask[None, :],
                    other=0.0)
        acc = tl.dot(ha, _dequant(w, s_base, k0 // 128, n, hidden // 128, nmask, ha.dtype, W8), acc)
    tw = tl.load(tw_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * hidden + n[None, :], (acc * tw[:, None]).to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & nmask[None, :])


@cached
@triton.jit(do_not_specialize=["num_assign"])
def _count_kernel(ids_ptr, counts_ptr, slot_ptr, num_assign, BLOCK: tl.constexpr):
    """counts[e] += 1 for each assignment routed to e; slot[a]: its place among them (atomic
    order, so rows of one expert sit in any order: each row's products are the same wherever
    it sits in a tile)."""
    a = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + a, mask=a < num_assign, other=-1)
    here = e >= 0
    slot = tl.atomic_add(counts_ptr + e, tl.full([BLOCK], 1, tl.int32), mask=here)
    tl.store(slot_ptr + a, slot, mask=here)


@cached
@triton.jit(do_not_specialize=["tiles"])
def _tile_kernel(counts_ptr, pstart_ptr, tile_expert_ptr, experts, tiles, BM: tl.constexpr, EP: tl.constexpr,
                 TB: tl.constexpr):
    """One program: each expert's run padded to whole tiles, where it starts, and which expert
    each tile belongs to (-1 past the last)."""
    e = tl.arange(0, EP)
    c = tl.load(counts_ptr + e, mask=e < experts, other=0)
    padded = (c + BM - 1) // BM * BM
    pend = tl.cumsum(padded, axis=0)
    tl.store(pstart_ptr + e, pend - padded, mask=e < experts)
    total = tl.sum(padded, axis=0)
    for t0 in range(0, tiles, TB):
        t = t0 + tl.arange(0, TB)
        first = t * BM
        owner = tl.sum((pend[None, :] <= first[:, None]).to(tl.int32), axis=1)
        tl.store(tile_expert_ptr + t, tl.where(first < total, owner, -1), mask=t < tiles)


@cached
@triton.jit(do_not_specialize=["num_assign"])
def _place_kernel(ids_ptr, slot_ptr, pstart_ptr, rows_ptr, num_assign, BLOCK: tl.constexpr):
    a = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + a, mask=a < num_assign, other=-1)
    here = e >= 0
    pos = tl.load(pstart_ptr + e, mask=here, other=0) + tl.load(slot_ptr + a, mask=here, other=0)
    tl.store(rows_ptr + pos, a, mask=here)


def sort_by_expert(ids: torch.Tensor, experts: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids: [A] local expert of each assignment (-1: held elsewhere). Returns (rows, tile_expert):
    rows [P] int32, the assignment indices grouped by expert, each expert's run padded with A to
    a multiple of bm; tile_expert [P / bm] int32, the expert of each tile, -1 past the last. P is
    a bound fixed by A (A + experts * (bm - 1), rounded up to bm), so there is no host sync;
    three launches besides two fills."""
    a = ids.numel()
    dev = ids.device
    tiles = triton.cdiv(a + experts * (bm - 1), bm)
    counts = torch.zeros(experts, dtype=torch.int32, device=dev)
    slot = torch.empty(a, dtype=torch.int32, device=dev)
    pstart = torch.empty(experts, dtype=torch.int32, device=dev)
    rows = torch.full((tiles * bm,), a, dtype=torch.int32, device=dev)
    tile_expert = torch.empty(tiles, dtype=torch.int32, device=dev)
    grid = (triton.cdiv(a, 1024),)
    _count_kernel[grid](ids, counts, slot, a, 1024, num_warps=4)
    _tile_kernel[(1,)](counts, pstart, tile_expert, experts, tiles, bm, triton.next_power_of_2(experts), 64,
                       num_warps=4)
    _place_kernel[grid](ids, slot, pstart, rows, a, 1024, num_warps=4)
    return rows, tile_expert


def sorted_experts(x, topk_ids, topk_weights, w13, w2, act, tiles: Optional[Tiles] = None, *, w13_scale=None,
                   w2_scale=None, residual: Optional[torch.Tensor] = None):
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]) for bf16/fp16; ids local, -1 = held elsewhere; fp8 w13/w2
    with their block scales as in triton_experts; with residual [T, H] (contiguous, x's dtype), residual + that
    sum in the sum's launch. None for activations or dtypes it does not take."""
    name = getattr(act, "__name__", "")
    if name not in _ACTS or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    w8, s13, ss13, s2, ss2 = weight_scales(w13, w13_scale, w2, w2_scale)
    rows_n, k = topk_ids.shape
    experts, hidden, inter = w13.shape[0], w13.shape[1], w2.shape[1]
    num_assign = rows_n * k
    t = tiles or _tiles(num_assign, experts, w8)
    x = x.contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    tw = topk_weights.reshape(-1).contiguous()
    rows, tile_expert = sort_by_expert(ids, experts, t.bm)
    h = torch.empty((rows.numel(), inter), dtype=x.dtype, device=x.device)
    _sorted_gate_up_kernel[(triton.cdiv(inter, t.bn1), tile_expert.numel())](
        x, rows, tile_expert, w13, s13, h, num_assign, hidden, inter, w13.stride(0), ss13, k, _ACTS[name], t.bm,
        t.bn1, t.bk1, w8, num_warps=t.warps, num_stages=t.stages)
    y = torch.empty((num_assign, hidden), dtype=x.dtype, device=x.device)
    _sorted_down_kernel[(triton.cdiv(hidden, t.bn2), tile_expert.numel())](
        h, rows, tile_expert, tw, w2, s2, y, num_assign, hidden, inter, w2.stride(0), ss2, t.bm, t.bn2, t.bk2, w8,
        num_warps=t.warps, num_stages=t.stages)
    out = torch.empty((rows_n, hidden), dtype=x.dtype, device=x.device)
    res = residual is not None
    _sum_kernel[(rows_n, triton.cdiv(hidden, 1024))](y, ids, out, residual if res else out, hidden, k, 1024, res,
                                                     num_warps=4)
    return out


def cuda_experts(x, topk_ids, topk_weights, w13, w2, act, *, w13_scale=None, w2_scale=None, residual=None):
    """The expert kernel the cuda platform registers: the masked Triton kernels at decode sizes,
    the expert-sorted ones above (float32 above decode sizes: None, the portable path); fp8
    weights (with their block scales) through the same kernels; residual as in triton_experts."""
    if not w13.is_cuda:
        return None
    scales = dict(w13_scale=w13_scale, w2_scale=w2_scale, residual=residual)
    if topk_ids.numel() <= MAX_ASSIGNMENTS:
        return triton_experts(x, topk_ids, topk_weights, w13, w2, act, **scales)
    return sorted_experts(x, topk_ids, topk_weights, w13, w2, act, **scales)
