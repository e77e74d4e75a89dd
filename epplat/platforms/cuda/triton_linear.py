"""Skinny linear layers (decode: a few rows times a large weight) as one Triton launch.

y[M, N] = x[M, K] @ W[N, K]^T (+ bias). Each program streams BN whole rows of W (contiguous
in K, so every load is long and coalesced) and multiplies them with all M rows of x at
once on tensor cores (M padded to 16). At M of a few rows cuBLAS picks kernels that reach
about 2 TB/s on an H100 for these shapes; a decode step is ~4 such GEMMs a layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16           # above this, cuBLAS (see benchmarks/moe_layer_bench.py --linear)
MAX_COLS = 16384        # the vocabulary projection stays with cuBLAS, which streams it at full speed


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    m = tl.arange(0, BM)
    nmask = n < N
    mmask = m < M
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        x = tl.load(x_ptr + m[:, None] * stride_xm + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + kk[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0.0)
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias=None, bn: int = 16, bk: int = 256, stages: int = 4,
                  warps: int = 4, force: bool = False):
    """F.linear for at most MAX_ROWS rows of x and a contiguous [N, K] weight of x's dtype; None
    for anything else (the caller then uses F.linear)."""
    if x.dim() != 2 or not x.is_cuda or w.dtype != x.dtype or not w.is_contiguous() or x.stride(-1) != 1:
        return None
    m, k = x.shape
    n = w.shape[0]
    if not force and (m > MAX_ROWS or n > MAX_COLS or m == 0):
        return None
    ieee = x.dtype == torch.float32
    if ieee:
        bk, stages = min(bk, 64), 2
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm = max(16, triton.next_power_of_2(m))
    _skinny_kernel[(triton.cdiv(n, bn),)](x, w, bias if bias is not None else w, y, m, n, k, x.stride(0),
                                          bias is not None, ieee, bm, bn, bk, num_warps=warps, num_stages=stages)
    return y
