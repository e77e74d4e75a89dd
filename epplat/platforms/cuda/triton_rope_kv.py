"""The attention's step between the qkv GEMM and the attention kernel in one Triton launch.

From the fused qkv rows [T, (H + 2 KVH) D]: the per-head q/k RMSNorm (Qwen3's q_norm and
k_norm, where the model has them), the neox rotary of q and k, and the write of the rotated
keys and the values into their KV-cache slots; returns q [T, H, D] (and, for a prefill's attention, the
rotated keys and the values [T, KVH, D]). The module path runs this
as five kernels (two norms, the rotary, a copy of the strided values, the KV write). Rounding
as the torch code rounds (epplat.core.model.layers): the norm in float32 rounded to the dtype
then multiplied by the weight, every rotary product rounded (triton_norm.rotate_halves).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epplat.platforms.cuda import pdl as _pdl
from epplat.platforms.cuda.launch import cached
from epplat.platforms.cuda.triton_norm import cos_sin, rotate_halves


@triton.jit
def _normed_halves(base, w_ptr, eps, NH: tl.constexpr, NHP: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr,
                   dt: tl.constexpr):
    """NH heads at base, as float32 halves [NHP, HALF], RMSNormed per head when NORM."""
    h = tl.arange(0, NHP)
    j = tl.arange(0, HALF)
    hm = (h < NH)[:, None]
    ptr = base + h[:, None] * (2 * HALF) + j[None, :]
    x1 = tl.load(ptr, mask=hm, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=hm, other=0.0).to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + j).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + j).to(tl.float32)
        x1 = (w1[None, :] * (x1 * rstd[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (w2[None, :] * (x2 * rstd[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    return x1, x2


@cached
@triton.jit
def _qk_norm_rope_kv_kernel(qkv_ptr, qw_ptr, kw_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr,
                            ko_ptr, vo_ptr, qkv_stride, eps, QH: tl.constexpr, KH: tl.constexpr, QHP: tl.constexpr,
                            KHP: tl.constexpr, HALF: tl.constexpr, VROW_P: tl.constexpr, NORM: tl.constexpr,
                            KV_OUT: tl.constexpr, PDL: tl.constexpr):
    _pdl.start(PDL)
    t = tl.program_id(0)
    dt = q_ptr.dtype.element_ty
    p = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    c1, c2, s1, s2 = cos_sin(cos_ptr, sin_ptr, p, HALF, dt)
    row = qkv_ptr + t.to(tl.int64) * qkv_stride
    j = tl.arange(0, HALF)
    x1, x2 = _normed_halves(row, qw_ptr, eps, QH, QHP, HALF, NORM, dt)
    o1, o2 = rotate_halves(x1, x2, c1, c2, s1, s2, dt)
    h = tl.arange(0, QHP)
    out = q_ptr + (t.to(tl.int64) * QH + h[:, None]) * (2 * HALF) + j[None, :]
    tl.store(out, o1, mask=(h < QH)[:, None])
    tl.store(out + HALF, o2, mask=(h < QH)[:, None])
    x1, x2 = _normed_halves(row + QH * 2 * HALF, kw_ptr, eps, KH, KHP, HALF, NORM, dt)
    o1, o2 = rotate_halves(x1, x2, c1, c2, s1, s2, dt)
    h = tl.arange(0, KHP)
    out = kc_ptr + slot * (KH * 2 * HALF) + h[:, None] * (2 * HALF) + j[None, :]
    tl.store(out, o1.to(kc_ptr.dtype.element_ty), mask=(h < KH)[:, None])
    tl.store(out + HALF, o2.to(kc_ptr.dtype.element_ty), mask=(h < KH)[:, None])
    i = tl.arange(0, VROW_P)
    vm = i < KH * 2 * HALF
    v = tl.load(row + (QH + KH) * 2 * HALF + i, mask=vm)
    tl.store(vc_ptr + slot * (KH * 2 * HALF) + i, v.to(vc_ptr.dtype.element_ty), mask=vm)
    if KV_OUT:     # the rotated keys and the values, contiguous [T, KVH, D], for a prefill chunk's attention
        out = ko_ptr + (t.to(tl.int64) * KH + h[:, None]) * (2 * HALF) + j[None, :]
        tl.store(out, o1, mask=(h < KH)[:, None])
        tl.store(out + HALF, o2, mask=(h < KH)[:, None])
        tl.store(vo_ptr + t.to(tl.int64) * (KH * 2 * HALF) + i, v, mask=vm)


def takes(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes these head shapes (the head dim's half a power of two)."""
    half = head_dim // 2
    return head_dim % 2 == 0 and half >= 1 and not half & (half - 1) and heads > 0 and kv_heads > 0


def qk_norm_rope_kv(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, q_norm, k_norm, eps: float,
                    positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor, pdl: bool = False, kv_out: bool = False):
    """q [T, heads, head_dim] normed (q_norm / k_norm: weights [head_dim], or both None) and rotated; the
    rotated keys and the values written to their slots of k_cache / v_cache [blocks, block, KVH, D]. With
    kv_out, (q, k, v): the rotated keys and the values [T, KVH, D] too."""
    t = qkv.shape[0]
    q = torch.empty((t, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = v = q
    if kv_out:
        k, v = (torch.empty((t, kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device) for _ in range(2))
    if t:
        norm = q_norm is not None
        _qk_norm_rope_kv_kernel[(t,)](
            qkv, q_norm if norm else qkv, k_norm if norm else qkv, positions, cos, sin, q, k_cache, v_cache,
            slot_mapping, k, v, qkv.stride(0), eps, heads, kv_heads, triton.next_power_of_2(heads),
            triton.next_power_of_2(kv_heads), head_dim // 2, triton.next_power_of_2(kv_heads * head_dim), norm,
            kv_out, pdl, num_warps=4, launch_pdl=pdl)
    return (q, k, v) if kv_out else q
