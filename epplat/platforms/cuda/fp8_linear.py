"""The block-scaled fp8 linear of ``--quantization fp8`` (DeepSeek-V3's scheme) as one Triton kernel.

y[M, N] = x[M, K] @ W[N, K]^T with W float8_e4m3fn and one float32 scale_inv per 128x128 block
of W ([ceil(N/128), ceil(K/128)], the checkpoint's layout, W ~= q * scale_inv). Shapes need not
be multiples of 128 (tails are masked). Two forms of each 128-deep step, by the number of rows:

- up to MAX_W8A16_ROWS rows (decode, where the GEMM is bound by the weight bytes): the fp8
  weight tile times its block scale, rounded to the activations' dtype in registers (what
  dequantize-to-bf16 gives), multiplied on the tensor cores against the unquantized
  activations: the fp8 bytes are the saving, and quantizing the activations would add work;
- above (prefill, bound by FLOPs): the activations are quantized per token and 128-wide group
  (DeepSeek-V3's scheme: scale = row amax / 448; a tail group over its own values), the step
  multiplies on the fp8 tensor cores and adds the product times (activation scale x weight
  block scale) into a float32 accumulator.

Decode-sized inputs (a few rows) give few output tiles, so the K loop is split over SPLIT_K
programs whose float32 partials are summed afterwards: a memory-bound GEMM needs programs on
every SM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epplat.platforms.cuda.launch import cached

GROUP = 128
TARGET_PROGRAMS = 264            # two per SM of an H100/H200
MAX_W8A16_ROWS = 256             # the largest decode graph; not yet measured against the fp8-dot form


@cached
@triton.jit
def _fp8_linear_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ys, stride_ym,
                       KB_PER_SPLIT, BM: tl.constexpr, BN: tl.constexpr, A8: tl.constexpr, IEEE: tl.constexpr):
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    split = tl.program_id(2)
    mm, nm = m < M, n < N
    acc = tl.zeros([BM, BN], tl.float32)
    kb0 = split * KB_PER_SPLIT
    kb1 = tl.minimum(kb0 + KB_PER_SPLIT, tl.cdiv(K, 128))
    for kb in range(kb0, kb1):
        k = kb * 128 + tl.arange(0, 128)
        km = k < K
        xa = tl.load(x_ptr + m[:, None].to(tl.int64) * stride_xm + k[None, :], mask=mm[:, None] & km[None, :],
                     other=0.0)
        w = tl.load(w_ptr + n[None, :].to(tl.int64) * stride_wn + k[:, None], mask=nm[None, :] & km[:, None],
                    other=0.0)                                                     # [128, BN]
        ws = tl.load(s_ptr + (n // 128) * stride_sn + kb, mask=nm, other=0.0)      # [BN]
        if A8:
            xf = xa.to(tl.float32)
            xs = tl.maximum(tl.max(tl.abs(xf), axis=1), 1e-10) / 448.0
            xq = (xf / xs[:, None]).to(tl.float8e4nv)
            acc += tl.dot(xq, w) * (xs[:, None] * ws[None, :])
        elif IEEE:
            acc = tl.dot(xa, w.to(tl.float32) * ws[None, :], acc, input_precision="ieee")
        else:
            acc = tl.dot(xa, (w.to(tl.float32) * ws[None, :]).to(xa.dtype), acc)
    y = y_ptr + split.to(tl.int64) * stride_ys + m[:, None].to(tl.int64) * stride_ym + n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, bias=None,
               out_dtype=None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (fp8, block scales scale_inv [ceil(N/128), ceil(K/128)]) + bias -> [..., N]."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], weight.shape[0]
    out_dtype = out_dtype or x.dtype
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 64 if m <= 64 else 128
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    kblocks = triton.cdiv(k, GROUP)
    split = max(1, min(kblocks, TARGET_PROGRAMS // tiles))
    per = triton.cdiv(kblocks, split)
    split = triton.cdiv(kblocks, per)
    y = torch.empty((split, m, n), dtype=torch.float32 if split > 1 else out_dtype, device=x.device)
    if m:
        _fp8_linear_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), split)](
            x2, weight, scale_inv, y, m, n, k, x2.stride(0), weight.stride(0), scale_inv.stride(0), y.stride(0),
            y.stride(1), per, bm, bn, m > MAX_W8A16_ROWS, x2.dtype == torch.float32, num_warps=4, num_stages=3)
    y = y.sum(0).to(out_dtype) if split > 1 else y[0]
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, n)
