"""FP8 MoE experts: 128x128 block-scaled float8_e4m3 weights, activations quantized per token
and 128-wide group inside the GEMM (DeepSeek-V3's scheme), as Triton kernels.

Same masked per-expert layout as triton_moe (one program per (expert, output tile), ids
scanned on the device). Each 128-deep reduction step quantizes its [BM, 128] activation
tile row by row (scale = row amax / 448), multiplies on the fp8 tensor cores and adds
the product times (activation scale x weight block scale) into a float32 accumulator.
Weights are stored input-major like the bf16 ones: w13 [E, H, 2I], w2 [E, I, H], with
scales [E, H/128, 2I/128] and [E, I/128, H/128] (w ~= q * scale).

Above MAX_FP8_ASSIGNMENTS the weights are dequantized to bf16 per call and go through the
bf16 expert-sorted kernels (triton_moe_sorted; correct, not fast: prefill with fp8 is not
optimised yet); the log says so the first time.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from epplat.core.moe.experts import capturable_experts
from epplat.platforms.cuda.triton_moe import (_ACTS, _SCAN, MAX_ASSIGNMENTS, _my_expert, _routed_rows, _sum_kernel)
from epplat.platforms.cuda.triton_moe_sorted import sorted_experts

BLOCK = 128
FP8_MAX = 448.0
logger = logging.getLogger(__name__)


@triton.jit
def _quant_rows(a):
    """[BM, 128] float32 -> (float8_e4m3 values, [BM] scales): one scale per row (token group)."""
    s = tl.maximum(tl.max(tl.abs(a), axis=1), 1e-10) / 448.0
    return (a / s[:, None]).to(tl.float8e4nv), s


@triton.jit(do_not_specialize=["num_assign"])
def _fp8_gate_up_kernel(x_ptr, ids_ptr, w_ptr, ws_ptr, h_ptr, num_assign, hidden, inter, stride_we, stride_se,
                        K: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BY_SLOT: tl.constexpr, SCAN: tl.constexpr):
    e, count = _my_expert(ids_ptr, num_assign, BY_SLOT, SCAN)
    n0 = tl.program_id(1) * BN
    n = n0 + tl.arange(0, BN)
    nblocks = 2 * inter // 128
    w_base = w_ptr + e.to(tl.int64) * stride_we
    s_base = ws_ptr + e.to(tl.int64) * stride_se
    for c in range(0, tl.cdiv(count, BM)):
        m = c * BM + tl.arange(0, BM)
        valid = m < count
        rows = _routed_rows(ids_ptr, e, m, num_assign, SCAN)
        tok = (rows // K).to(tl.int64)
        acc_g = tl.zeros([BM, BN], tl.float32)
        acc_u = tl.zeros([BM, BN], tl.float32)
        for kb in range(0, hidden // 128):
            kk = kb * 128 + tl.arange(0, 128)
            xa = tl.load(x_ptr + tok[:, None] * hidden + kk[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            xq, xs = _quant_rows(xa)
            wp = w_base + kk[:, None].to(tl.int64) * (2 * inter) + n[None, :]
            wg = tl.load(wp)
            wu = tl.load(wp + inter)
            sg = tl.load(s_base + kb * nblocks + n0 // 128)
            su = tl.load(s_base + kb * nblocks + (inter + n0) // 128)
            acc_g += tl.dot(xq, wg) * (xs[:, None] * sg)
            acc_u += tl.dot(xq, wu) * (xs[:, None] * su)
        if ACT == 0:
            g = acc_g * tl.sigmoid(acc_g)
        else:
            g = 0.5 * acc_g * (1.0 + tl.erf(acc_g * 0.7071067811865476))
        tl.store(h_ptr + rows[:, None].to(tl.int64) * inter + n[None, :], (g * acc_u).to(h_ptr.dtype.element_ty),
                 mask=valid[:, None])


@triton.jit(do_not_specialize=["num_assign"])
def _fp8_down_kernel(h_ptr, ids_ptr, tw_ptr, w_ptr, ws_ptr, y_ptr, num_assign, hidden, inter, stride_we, stride_se,
                     BM: tl.constexpr, BN: tl.constexpr, BY_SLOT: tl.constexpr, SCAN: tl.constexpr):
    e, count = _my_expert(ids_ptr, num_assign, BY_SLOT, SCAN)
    n0 = tl.program_id(1) * BN
    n = n0 + tl.arange(0, BN)
    nblocks = hidden // 128
    w_base = w_ptr + e.to(tl.int64) * stride_we
    s_base = ws_ptr + e.to(tl.int64) * stride_se
    for c in range(0, tl.cdiv(count, BM)):
        m = c * BM + tl.arange(0, BM)
        valid = m < count
        rows = _routed_rows(ids_ptr, e, m, num_assign, SCAN).to(tl.int64)
        acc = tl.zeros([BM, BN], tl.float32)
        for kb in range(0, inter // 128):
            kk = kb * 128 + tl.arange(0, 128)
            ha = tl.load(h_ptr + rows[:, None] * inter + kk[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            hq, hs = _quant_rows(ha)
            w = tl.load(w_base + kk[:, None].to(tl.int64) * hidden + n[None, :])
            sw = tl.load(s_base + kb * nblocks + n0 // 128)
            acc += tl.dot(hq, w) * (hs[:, None] * sw)
        tw = tl.load(tw_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * hidden + n[None, :], (acc * tw[:, None]).to(y_ptr.dtype.element_ty),
                 mask=valid[:, None])


# the fp8 kernels stay ahead of dequantize + grouped GEMM further than the bf16 ones
MAX_FP8_ASSIGNMENTS = 4 * MAX_ASSIGNMENTS


_said = []


def _say_dequantized(num_assign: int, act: str) -> None:
    """One log line, the first time, that fp8 experts run dequantized to bf16 (never silently)."""
    if not _said:
        _said.append(True)
        why = (f"batches above {MAX_FP8_ASSIGNMENTS} (token, expert) assignments (this one: {num_assign})"
               if act in _ACTS else f"activation {act!r}")
        logger.info("fp8 experts: %s run with the expert weights dequantized to bfloat16 per call (the bf16 "
                    "grouped GEMM: fp8 prefill kernels are not optimised yet)", why)


def fp8_experts(x, topk_ids, topk_weights, w13, w2, act, *, w13_scale, w2_scale, bn: int = 64, stages: int = 3,
                warps: int = 4):
    """reference_experts' sum with fp8 block-scaled w13/w2 (see the module docstring)."""
    name = getattr(act, "__name__", "")
    rows, k = topk_ids.shape
    experts, hidden, inter = w13.shape[0], w13.shape[1], w2.shape[1]
    num_assign = rows * k
    if num_assign > MAX_FP8_ASSIGNMENTS or name not in _ACTS:
        _say_dequantized(num_assign, name)
        args = (x.to(torch.bfloat16), topk_ids, topk_weights.to(torch.bfloat16), dequantize(w13, w13_scale),
                dequantize(w2, w2_scale), act)
        out = sorted_experts(*args)
        return (capturable_experts(*args) if out is None else out).to(x.dtype)
    x = x.contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    tw = topk_weights.reshape(-1).contiguous()
    by_slot = num_assign < experts
    progs = num_assign if by_slot else experts
    bm = 16 if num_assign <= 16 * experts else 32
    h = torch.empty((num_assign, inter), dtype=torch.bfloat16, device=x.device)
    _fp8_gate_up_kernel[(progs, inter // bn)](x, ids, w13, w13_scale, h, num_assign, hidden, inter, w13.stride(0),
                                              w13_scale.stride(0), k, _ACTS[name], bm, bn, by_slot, _SCAN,
                                              num_warps=warps, num_stages=stages)
    y = torch.empty((num_assign, hidden), dtype=x.dtype, device=x.device)
    _fp8_down_kernel[(progs, hidden // bn)](h, ids, tw, w2, w2_scale, y, num_assign, hidden, inter, w2.stride(0),
                                            w2_scale.stride(0), bm, bn, by_slot, _SCAN, num_warps=warps,
                                            num_stages=stages)
    out = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    _sum_kernel[(rows, triton.cdiv(hidden, 1024))](y, ids, out, hidden, k, 1024, num_warps=4)
    return out


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K, N] (both multiples of 128) -> float8_e4m3 values and [..., K/128, N/128] float32
    scales with w ~= q * scale, one scale per 128x128 block (amax / 448)."""
    *lead, kdim, ndim = w.shape
    blocks = w.float().reshape(*lead, kdim // BLOCK, BLOCK, ndim // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp_min(1e-12) / FP8_MAX
    q = (blocks / scale[..., :, None, :, None]).to(torch.float8_e4m3fn).reshape(w.shape)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16, chunk: int = 16) -> torch.Tensor:
    """q * scale computed in float32 and rounded once to dtype, `chunk` matrices at a time (the
    float32 temporary of 128 experts would be 1.6 GB)."""
    *lead, kdim, ndim = q.shape
    flat_q, flat_s = q.reshape(-1, kdim, ndim), scale.reshape(-1, kdim // BLOCK, ndim // BLOCK)
    out = torch.empty(flat_q.shape, dtype=dtype, device=q.device)
    for i in range(0, flat_q.shape[0], chunk):
        blocks = flat_q[i:i + chunk].to(torch.float32).reshape(-1, kdim // BLOCK, BLOCK, ndim // BLOCK, BLOCK)
        out[i:i + chunk] = (blocks * flat_s[i:i + chunk, :, None, :, None]).reshape(-1, kdim, ndim)
    return out.reshape(q.shape)
