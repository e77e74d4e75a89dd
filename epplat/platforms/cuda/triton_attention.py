"""Decode attention over the paged KV cache as a Triton kernel (one program per sequence
and KV head, online softmax over the sequence's blocks). Reads only the blocks a
sequence uses and takes its lengths from a device tensor, so it can be captured in a
CUDA graph."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, scale,
                   table_stride, q_stride, kv_heads: tl.constexpr, group: tl.constexpr,
                   GROUP_P: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    length = tl.load(lens_ptr + b)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, D)
    s = tl.arange(0, BLOCK)
    gmask = g < group
    heads = kvh * group + g
    q = tl.load(q_ptr + b * q_stride + heads[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)
    q = q.to(tl.float32) * scale
    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_sum = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, D], tl.float32)
    for n in range(0, tl.cdiv(length, BLOCK)):
        block = tl.load(tables_ptr + b * table_stride + n).to(tl.int64)
        pos = n * BLOCK + s
        off = ((block * BLOCK + s)[:, None] * kv_heads + kvh) * D + d[None, :]
        k = tl.load(k_ptr + off).to(tl.float32)                       # [BLOCK, D]
        v = tl.load(v_ptr + off).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)        # [GROUP_P, BLOCK]
        scores = tl.where((pos < length)[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / l_sum[:, None]
    tl.store(out_ptr + b * q_stride + heads[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gmask[:, None])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                     lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, H, D]; caches [num_blocks, block_size, KVH, D]; tables [B, W]; lens [B] -> [B, H, D]."""
    b, h, d = q.shape
    block, kvh = k_cache.shape[1], k_cache.shape[2]
    group = h // kvh
    out = torch.empty_like(q)
    q = q.contiguous()
    _decode_kernel[(b, kvh)](q, k_cache, v_cache, tables, lens, out, scale, tables.stride(0), h * d,
                             kvh, group, max(triton.next_power_of_2(group), 1), block, d)
    return out
