"""FP8 MoE experts on CUDA: 128x128 block-scaled float8_e4m3 weights (DeepSeek-V3's scheme).

The GEMMs are the bf16 expert kernels' own (triton_moe at decode sizes, triton_moe_sorted
above), which read fp8 weight tiles and apply each block's scale in registers (see
triton_moe's docstring): no dequantized copy of the weights at any batch size. Weights are
stored input-major like the bf16 ones: w13 [E, H, 2I], w2 [E, I, H], with scales
[E, H/128, 2I/128] and [E, I/128, H/128] (w ~= q * scale). The block arithmetic is
epplat.core.model.fp8_blocks'; here it runs a few experts at a time, so the float32
temporary stays small (128 experts of one layer would be 1.6 GB).

Activations the kernels do not take (other than silu / gelu) run on dequantized weights
through the portable path; the log says so the first time.
"""

from __future__ import annotations

import logging

import torch

from epplat.core.model.fp8_blocks import dequantize_blocks, quantize_blocks
from epplat.core.moe.experts import capturable_experts
from epplat.platforms.cuda.triton_moe_sorted import cuda_experts

logger = logging.getLogger(__name__)
_said = []


def fp8_experts(x, topk_ids, topk_weights, w13, w2, act, *, w13_scale, w2_scale):
    """reference_experts' sum with fp8 block-scaled w13/w2 (see the module docstring)."""
    out = cuda_experts(x, topk_ids, topk_weights, w13, w2, act, w13_scale=w13_scale, w2_scale=w2_scale)
    if out is not None:
        return out
    if not _said:
        _said.append(True)
        logger.info("fp8 experts: activation %r runs with the expert weights dequantized to bfloat16 per call "
                    "(the Triton kernels take silu and gelu)", getattr(act, "__name__", act))
    return capturable_experts(x.to(torch.bfloat16), topk_ids, topk_weights.to(torch.bfloat16),
                              dequantize(w13, w13_scale), dequantize(w2, w2_scale), act).to(x.dtype)


def quantize(w: torch.Tensor, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K, N] (both multiples of 128) -> float8_e4m3 values and [..., K/128, N/128] float32
    scales (fp8_blocks.quantize_blocks), `chunk` matrices at a time."""
    *lead, kdim, ndim = w.shape
    flat = w.reshape(-1, kdim, ndim)
    q = torch.empty(flat.shape, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty((flat.shape[0], kdim // 128, ndim // 128), dtype=torch.float32, device=w.device)
    for i in range(0, flat.shape[0], chunk):
        q[i:i + chunk], s[i:i + chunk] = quantize_blocks(flat[i:i + chunk])
    return q.reshape(w.shape), s.reshape(*lead, kdim // 128, ndim // 128)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16, chunk: int = 16) -> torch.Tensor:
    """q * scale (fp8_blocks.dequantize_blocks: float32, rounded once to dtype), `chunk` matrices at a time."""
    *lead, kdim, ndim = q.shape
    flat_q, flat_s = q.reshape(-1, kdim, ndim), scale.reshape(-1, kdim // 128, ndim // 128)
    out = torch.empty(flat_q.shape, dtype=dtype, device=q.device)
    for i in range(0, flat_q.shape[0], chunk):
        out[i:i + chunk] = dequantize_blocks(flat_q[i:i + chunk], flat_s[i:i + chunk], 128, dtype)
    return out.reshape(q.shape)
