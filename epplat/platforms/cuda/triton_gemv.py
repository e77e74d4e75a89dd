"""The skinny GEMMs of a decode step at batch 1-4 (y = x @ W^T for a few rows of x) as one Triton launch.

At batch 1 a Qwen3-30B-A3B layer's qkv, o_proj and router GEMMs read 21, 17 and 0.5 MB of weights for one
row of activations; on an H200 cuBLAS took the first two at 55-64% of the copy bandwidth and the router in
two launches (split-K and a reduce, 4.9 + 1.7 us for 0.5 MB). Here each program takes BN whole rows of W
(contiguous along K, read BK at a time: 8 KB a step at batch 1) against every row of x, multiplies on the CUDA cores
in float32 (a few rows need no tensor cores) and stores its outputs rounded once to x's dtype, as cuBLAS's
float32-accumulated GEMM rounds them. BN is the widest that still gives every SM several programs, so each
SM keeps several loads in flight: the GEMM is bound by the weight bytes, not by arithmetic.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from epplat.platforms.cuda import pdl as _pdl
from epplat.platforms.cuda.launch import cached

MAX_ROWS = 4                 # rows it takes (CUDA-core products and L1 re-reads of W grow with them); more: cuBLAS
_TILE = 4096                 # elements of a program's [rows x BN, BK] tile a step (8 KB of W at batch 1)
_PER_SM = 4                  # programs per SM (or per CPU for Triton's interpreter, which runs one at a time)


@functools.lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@cached
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, M_P: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    # lane i of the [M_P * BN, BK] tile holds row i // BN of x against row i % BN of this program's W rows: one
    # 2-D tile whatever M (at batch 1 exactly BN x BK); W's repeats for M > 1 and x's over the BN rows come from
    # L1, not from HBM (x loaded once and broadcast costs a shared-memory layout change a step in sm_90 PTX)
    i = tl.arange(0, M_P * BN)
    m = i // BN
    n = tl.program_id(0) * BN + i % BN
    lane = (m < M) & (n < N)
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_wn
    x_rows = x_ptr + m[:, None] * stride_xm
    if PDL:     # W is no kernel's output: into L2 while the kernel before this one finishes
        line = tl.arange(0, BK // 64) * 64
        for k0 in range(0, K, BK):
            kl = tl.minimum(k0 + line, K - 1)
            _pdl.prefetch_l2(tl.where(lane[:, None], w_rows, w_ptr) + kl[None, :])
    _pdl.start(PDL)
    acc = tl.zeros([M_P * BN, BK], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        mask = lane[:, None] & (kk < K)[None, :]
        w = tl.load(w_rows + kk[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(x_rows + kk[None, :], mask=mask, other=0.0).to(tl.float32) * w
    tl.store(y_ptr + m * stride_ym + n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=lane)


def tiles(n: int, k: int, sms: int, m: int = 1) -> tuple[int, int]:
    """(BN, BK) for m rows: BN rows of W a program, the widest power of two up to 16 that leaves _PER_SM programs
    for each of ``sms`` SMs (or 1 for a short W); BK so that a step's [m * BN, BK] tile is _TILE elements (at
    m = 1 two 16-byte loads of W per thread and step, ~40 registers in PTX for sm_90), at most K's power of two."""
    bn = 16
    while bn > 1 and -(-n // bn) < _PER_SM * sms:
        bn //= 2
    return bn, max(16, min(_TILE // (bn * triton.next_power_of_2(m)), triton.next_power_of_2(k)))


def gemv(x: torch.Tensor, w: torch.Tensor, out: Optional[torch.Tensor] = None, pdl: bool = False
         ) -> Optional[torch.Tensor]:
    """x [M, K] @ w[N, K]^T -> [M, N] in x's dtype (into ``out`` where given) for M <= MAX_ROWS, K-contiguous
    rows of both and one dtype; None otherwise (the caller's GEMM then runs)."""
    m, k = x.shape
    n = w.shape[0]
    if not (0 < m <= MAX_ROWS and w.dim() == 2 and w.shape[1] == k and x.dtype == w.dtype and x.stride(1) == 1
            and w.stride(1) == 1 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)):
        return None
    y = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    bn, bk = tiles(n, k, _sms(x.device), m)
    _gemv_kernel[(triton.cdiv(n, bn),)](x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                                        triton.next_power_of_2(m), bn, bk, pdl, num_warps=4, launch_pdl=pdl)
    return y
