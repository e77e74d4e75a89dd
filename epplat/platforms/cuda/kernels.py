"""The cuda platform's Kernels record (epplat.core.ops): the Triton kernels of this package where
triton is installed; half-precision experts the Triton kernels decline (or all of them, without
triton) through torch's grouped GEMM without a host sync, so CUDA graphs can capture them."""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from epplat.core.moe.experts import capturable_experts
from epplat.core.ops import Kernels, bf16_grouped_mm


def half_experts(x, topk_ids, topk_weights, w13, w2, act) -> Optional[torch.Tensor]:
    """bfloat16 / float16 experts without a host sync (CUDA graphs); None for float32 (the reference)."""
    if x.dtype in (torch.bfloat16, torch.float16) and hasattr(torch, "_grouped_mm"):
        return capturable_experts(x, topk_ids, topk_weights, w13, w2, act)
    return None


def cuda_kernels() -> Kernels:
    if importlib.util.find_spec("triton") is None:
        return Kernels(experts=half_experts, grouped_mm=bf16_grouped_mm)
    from epplat.platforms.cuda import triton_moe, triton_moe_sorted, triton_norm
    from epplat.platforms.cuda.decode_layer import decode_layer
    from epplat.platforms.cuda.prefill_layer import prefill_layer
    from epplat.platforms.cuda.triton_attention import decode_attention, write_kv
    from epplat.platforms.cuda.triton_mla import mla_decode_attention
    from epplat.platforms.cuda.triton_prefill_attention import prefill_attention
    from epplat.platforms.cuda.triton_sample import sample

    def experts(x, topk_ids, topk_weights, w13, w2, act) -> Optional[torch.Tensor]:
        """Triton: the masked kernels at decode sizes, the expert-sorted ones above."""
        out = triton_moe_sorted.cuda_experts(x, topk_ids, topk_weights, w13, w2, act)
        return half_experts(x, topk_ids, topk_weights, w13, w2, act) if out is None else out

    experts.with_residual = triton_moe_sorted.cuda_experts     # the form that adds a residual (prefill_layer)

    def decoder_layer(layer, x, positions, meta):
        """The fused layer of the step's kind: with prefill chunks, or decodes only."""
        return (prefill_layer if meta.prefills else decode_layer)(layer, x, positions, meta)

    return Kernels(decode_attention=decode_attention, prefill_attention=prefill_attention, kv_write=write_kv, mla_decode_attention=mla_decode_attention,
                   rms_norm=triton_norm.rms_norm,
                   rope=triton_norm.rope, route=triton_moe.fused_topk, experts=experts,
                   grouped_mm=bf16_grouped_mm, sample=sample, decoder_layer=decoder_layer)
