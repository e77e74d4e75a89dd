"""RMSNorm and rotary embedding as single Triton launches, rounding where the torch code they
replace (epplat.core.model.layers) rounds: normalise in float32, round to the input dtype,
then multiply by the weight; rotary products rounded to the input dtype one by one. (On an
H100 a few rotary outputs still differ from torch's in the last bf16 bit.)
A decode step runs ~4 of these per layer; in plain torch each is 6-12 small kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epplat.platforms.cuda import pdl as _pdl
from epplat.platforms.cuda.launch import cached


@cached
@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, heads, stride_t, stride_h, eps, D: tl.constexpr, DP: tl.constexpr,
                     PDL: tl.constexpr = False):
    _pdl.start(PDL)
    r = tl.program_id(0)
    t, h = r // heads, r % heads
    d = tl.arange(0, DP)
    m = d < D
    x = tl.load(x_ptr + t.to(tl.int64) * stride_t + h * stride_h + d, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + d, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + r.to(tl.int64) * D + d, (w * y).to(out_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, pdl: bool = False):
    """RMSNorm over the last dim of x ([T, D] or [T, H, D], last dim contiguous); None when the
    weight's dtype differs from x's (the torch code would promote)."""
    if weight.dtype != x.dtype or x.stride(-1) != 1 or x.dim() not in (2, 3):
        return None
    d = x.shape[-1]
    heads = x.shape[1] if x.dim() == 3 else 1
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = x.shape[0] * heads
    if rows:
        _rms_norm_kernel[(rows,)](x, weight, out, heads, x.stride(0), x.stride(1) if x.dim() == 3 else 0, eps, d,
                                  triton.next_power_of_2(d), pdl, num_warps=4 if d >= 1024 else 1, launch_pdl=pdl)
    return out


@cached
@triton.jit
def _add_rms_norm_kernel(x_ptr, a_ptr, w_ptr, sum_ptr, out_ptr, eps, D: tl.constexpr, DP: tl.constexpr,
                         PDL: tl.constexpr):
    _pdl.start(PDL)
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, DP)
    m = d < D
    s = tl.load(x_ptr + t * D + d, mask=m, other=0.0).to(tl.float32) + tl.load(a_ptr + t * D + d, mask=m,
                                                                               other=0.0).to(tl.float32)
    x = s.to(sum_ptr.dtype.element_ty)            # rounded as torch's add rounds its float32 sum
    tl.store(sum_ptr + t * D + d, x, mask=m)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + d, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + d, (w * y).to(out_ptr.dtype.element_ty), mask=m)


def add_rms_norm(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float, pdl: bool = False):
    """(x + a, RMSNorm(x + a)) for contiguous [T, D] x and a of one dtype, in one launch (the decoder layer's
    residual add and post-attention norm), the sum rounded to the dtype as torch's add rounds it; None for
    other inputs."""
    if not (x.dtype == a.dtype == weight.dtype and x.shape == a.shape and x.dim() == 2 and x.is_contiguous()
            and a.is_contiguous()):
        return None
    s, out = torch.empty_like(x), torch.empty_like(x)
    if x.shape[0]:
        d = x.shape[1]
        _add_rms_norm_kernel[(x.shape[0],)](x, a, weight, s, out, eps, d, triton.next_power_of_2(d), pdl,
                                            num_warps=4 if d >= 1024 else 1, launch_pdl=pdl)
    return s, out


@triton.jit
def _round(x, dt: tl.constexpr):
    return x.to(dt)


@triton.jit
def rotate_halves(x1, x2, c1, c2, s1, s2, dt: tl.constexpr):
    """Neox rotary of [heads, HALF] float32 halves: x * cos + rotate_half(x) * sin with rotate_half(x) =
    [-x2, x1], every product and the sum rounded to dt as torch's elementwise ops do (float32 math, then
    a rounding); returns the halves in dt."""
    o1 = _round(x1 * c1[None, :], dt).to(tl.float32) + _round(-x2 * s1[None, :], dt).to(tl.float32)
    o2 = _round(x2 * c2[None, :], dt).to(tl.float32) + _round(x1 * s2[None, :], dt).to(tl.float32)
    return o1.to(dt), o2.to(dt)


@triton.jit
def cos_sin(cos_ptr, sin_ptr, p, HALF: tl.constexpr, dt: tl.constexpr):
    """Position p's rows of the float32 tables, rounded to dt as the torch code rounds them, in halves."""
    j = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + p * 2 * HALF + j).to(dt).to(tl.float32)
    c2 = tl.load(cos_ptr + p * 2 * HALF + HALF + j).to(dt).to(tl.float32)
    s1 = tl.load(sin_ptr + p * 2 * HALF + j).to(dt).to(tl.float32)
    s2 = tl.load(sin_ptr + p * 2 * HALF + HALF + j).to(dt).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _rope_heads(src, dst, t, st, sh, c1, c2, s1, s2, NH: tl.constexpr, NHP: tl.constexpr, HALF: tl.constexpr):
    dt = dst.dtype.element_ty
    j = tl.arange(0, HALF)
    h = tl.arange(0, NHP)
    hm = (h < NH)[:, None]
    base = src + t.to(tl.int64) * st + h[:, None] * sh + j[None, :]
    x1 = tl.load(base, mask=hm, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=hm, other=0.0).to(tl.float32)
    o1, o2 = rotate_halves(x1, x2, c1, c2, s1, s2, dt)
    ob = dst + (t.to(tl.int64) * NH + h[:, None]) * (2 * HALF) + j[None, :]
    tl.store(ob, o1, mask=hm)
    tl.store(ob + HALF, o2, mask=hm)


@cached
@triton.jit
def _rope_kernel(pos_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, q_st, q_sh, k_st, k_sh,
                 QH: tl.constexpr, KH: tl.constexpr, QHP: tl.constexpr, KHP: tl.constexpr, HALF: tl.constexpr):
    t = tl.program_id(0)
    p = tl.load(pos_ptr + t).to(tl.int64)
    c1, c2, s1, s2 = cos_sin(cos_ptr, sin_ptr, p, HALF, qo_ptr.dtype.element_ty)
    _rope_heads(q_ptr, qo_ptr, t, q_st, q_sh, c1, c2, s1, s2, QH, QHP, HALF)
    _rope_heads(k_ptr, ko_ptr, t, k_st, k_sh, c1, c2, s1, s2, KH, KHP, HALF)


def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Neox rotary embedding of q [T, H, D] and k [T, KVH, D] (last dim contiguous) with float32
    cos/sin tables [max_pos, D]; returns new contiguous (q, k)."""
    if q.stride(-1) != 1 or k.stride(-1) != 1 or q.dtype != k.dtype or q.shape[-1] % 2:
        return None
    t, qh, d = q.shape
    kh = k.shape[1]
    if d // 2 & (d // 2 - 1):
        return None
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t:
        _rope_kernel[(t,)](positions, q, k, cos, sin, qo, ko, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                           qh, kh, triton.next_power_of_2(qh), triton.next_power_of_2(kh), d // 2, num_warps=4)
    return qo, ko
