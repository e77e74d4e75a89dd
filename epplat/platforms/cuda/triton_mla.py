"""MLA decode attention over the paged latent cache as a Triton kernel (DeepSeek, weights absorbed).

The cache is [num_blocks, block_size, 1, r + dr]: per token the latent (r = kv_lora_rank) and
the rotary key (dr), shared by every head. A query is q_latent [r] (q_nope through W_UK) and
q_pe [dr]; the score is q_latent . latent + q_pe . k_pe, and the values are the latents, so
one tile of the cache serves every head of a program. Split over the KV length
(flash-decoding) like triton_attention's kernel: each program takes one sequence, 16 heads
and one slice of its blocks; triton_attention's merge kernel combines the slices by their
log-sum-exp. Lengths come from a device tensor (capturable in a CUDA graph).

Any head count: a program's 16 head slots past the last head are masked (a TP rank of
V2-Lite holds 8 of its 16 heads). Its result does not depend on the block table's width
(the splits come from the batch size, each split's range from the sequence's length), so a
CUDA graph's full-width table and an eager step's exact one give the same bits; the torch
path's gather over the whole table does not (issue #15: the fp8 DeepSeek test's 4-head
model ran it, and its graphs-vs-eager rounding difference flipped a greedy token once fp8
activation rounding amplified it). Declines (returns None, the torch path runs) block sizes
below 16 and dims that are not powers of two. The cuda platform's Kernels record
hands it to MLA as ``mla_decode_attention``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epplat.platforms.cuda.launch import cached
from epplat.platforms.cuda.triton_attention import _TARGET_PROGRAMS, _merge_kernel, online_softmax_step, softmax_result

_HEADS = 16     # heads per program (tl.dot's smallest M)


@cached
@triton.jit(do_not_specialize=["table_stride"])
def _mla_decode_split_kernel(ql_ptr, qp_ptr, c_ptr, tables_ptr, lens_ptr, o_ptr, lse_ptr, scale, table_stride,
                             H: tl.constexpr, HG: tl.constexpr, splits: tl.constexpr, BLOCK: tl.constexpr,
                             R: tl.constexpr, DR: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0)
    hg = tl.program_id(1)
    sp = tl.program_id(2)
    length = tl.load(lens_ptr + b)
    nblocks = tl.cdiv(length, BLOCK)
    per = tl.cdiv(nblocks, splits)
    start = sp * per
    end = tl.minimum(start + per, nblocks)
    g = tl.arange(0, HG)
    r = tl.arange(0, R)
    dr = tl.arange(0, DR)
    s = tl.arange(0, BLOCK)
    real = hg * HG + g < H
    heads = (b * H + hg * HG + g).to(tl.int64)
    ql = tl.load(ql_ptr + heads[:, None] * R + r[None, :], mask=real[:, None], other=0.0)
    qp = tl.load(qp_ptr + heads[:, None] * DR + dr[None, :], mask=real[:, None], other=0.0)
    m = tl.full([HG], float("-inf"), tl.float32)
    l_sum = tl.zeros([HG], tl.float32)
    acc = tl.zeros([HG, R], tl.float32)
    for n in range(start, end):
        block = tl.load(tables_ptr + b * table_stride + n).to(tl.int64)
        row = (block * BLOCK + s) * (R + DR)
        kl = tl.load(c_ptr + row[:, None] + r[None, :])           # [BLOCK, R] latents (the values too)
        kp = tl.load(c_ptr + row[:, None] + R + dr[None, :])      # [BLOCK, DR] rotary keys
        if IEEE:
            scores = (tl.dot(ql, tl.trans(kl), input_precision="ieee")
                      + tl.dot(qp, tl.trans(kp), input_precision="ieee")) * scale
        else:
            scores = (tl.dot(ql, tl.trans(kl)) + tl.dot(qp, tl.trans(kp))) * scale
        m, l_sum, acc = online_softmax_step(tl.where(((n * BLOCK + s) < length)[None, :], scores, float("-inf")),
                                            kl, m, l_sum, acc, IEEE)
    out, lse = softmax_result(m, l_sum, acc)
    rows = ((b * tl.cdiv(H, HG) + hg) * splits + sp) * HG + g
    tl.store(o_ptr + rows[:, None] * R + r[None, :], out)
    tl.store(lse_ptr + rows, lse)


def mla_decode_attention(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor,
                         lens: torch.Tensor, scale: float):
    """q_latent [B, H, r], q_pe [B, H, dr]; cache [blocks, block, 1, r + dr]; tables [B, W]; lens [B]
    -> [B, H, r] (attention output in latent space, before W_UV), or None for shapes it declines."""
    b, h, r = q_latent.shape
    dr, block = q_pe.shape[-1], cache.shape[1]
    pow2 = all(x >= 16 and not x & (x - 1) for x in (r, dr, block))
    if cache.shape[2] != 1 or cache.shape[3] != r + dr or not pow2 or not cache.is_contiguous():
        return None
    groups = -(-h // _HEADS)
    splits = min(32, 1 << ((-(-_TARGET_PROGRAMS // (b * groups))).bit_length() - 1))
    mid = torch.empty((b, groups, splits, _HEADS, r), dtype=torch.float32, device=q_latent.device)
    lse = torch.empty((b, groups, splits, _HEADS), dtype=torch.float32, device=q_latent.device)
    _mla_decode_split_kernel[(b, groups, splits)](
        q_latent.contiguous(), q_pe.contiguous().to(q_latent.dtype), cache, tables, lens, mid, lse, scale,
        tables.stride(0), h, _HEADS, splits, block, r, dr, q_latent.dtype == torch.float32, num_warps=8)
    # not empty_like: the absorbed query (an einsum's output) may be laid out heads-major
    out = torch.empty((b, h, r), dtype=q_latent.dtype, device=q_latent.device)
    _merge_kernel[(b, h)](mid, lse, out, h, groups, _HEADS, splits, triton.next_power_of_2(splits), _HEADS, r)
    return out
