"""A decoder layer of a step with prefill chunks on cuda in fewer launches than the modules' (Kernels.decoder_layer).

A 1 x 2048-token prefill step of the Qwen3-30B-A3B shape was bound by the host's kernel launches (~22 a
layer; docs/benchmarks.md), and several of those launches only move activations between the GEMMs. For a
step with prefill chunks (decodes beside them too) through a plain MoE layer, the same eligibility as
decode_layer's, this runs:

1. the input RMSNorm (triton_norm);
2. the qkv GEMM (``project``: cuBLAS, or the fp8 method's);
3. q/k norm + rotary + KV-cache write in one launch (triton_rope_kv), which also writes the rotated keys
   and the values contiguously for the chunks' attention (the modules: two norms, the rotary, a copy of
   the strided values, the KV write);
4. the attention of epplat.core.model.attention (the decode kernel for the decodes; for the chunks the
   platform's one-launch prefill attention where a chunk has a cached prefix, else SDPA per chunk), told
   the cache is written;
5. the o_proj GEMM;
6. residual add + RMSNorm in one launch (triton_norm.add_rms_norm);
7. the router (the modules' ``route``: GEMM and top-k kernel);
8. the platform's experts (masked or expert-sorted Triton kernels, bf16 or fp8), their sum adding the
   residual (the modules: a separate add).

Rounding as the modules round (each fused kernel rounds where the step it replaces did), so the tokens are
those of the module path. Steps without prefill chunks go to decode_layer; TP, an all2all across ranks and
other layers return None (the modules run).
"""

from __future__ import annotations

from typing import Optional

import torch

from epplat.core.model.attention import paged_attention
from epplat.core.model.decoder import DecoderLayer
from epplat.core.moe.all2all_torch import _TorchDistBackend
from epplat.platforms.cuda import triton_norm, triton_rope_kv
from epplat.platforms.cuda.decode_layer import _DTYPES, eligible, residual_experts
from epplat.platforms.cuda.triton_moe_sorted import cuda_experts


def prefill_layer(layer: DecoderLayer, x: torch.Tensor, positions: torch.Tensor, meta) -> Optional[torch.Tensor]:
    """``layer(x, positions, meta)`` for a step with prefill chunks; None when it does not apply."""
    if not meta.prefills or not eligible(layer) or x.dtype not in _DTYPES \
            or x.dtype != layer.input_layernorm.weight.dtype or x.shape[0] == 0:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    k_cache, v_cache = attn.kv_cache
    t = x.shape[0]
    x = x.contiguous()
    h = triton_norm.rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.eps)
    qkv = attn.project("qkv", h)
    norm = attn.q_norm is not None
    q, k, v = triton_rope_kv.qk_norm_rope_kv(
        qkv, attn.h, attn.kvh, attn.d, attn.q_norm.weight if norm else None, attn.k_norm.weight if norm else None,
        attn.q_norm.eps if norm else 0.0, positions, attn.rope.cos, attn.rope.sin, k_cache, v_cache,
        meta.slot_mapping, kv_out=True)
    o = paged_attention(q, k, v, attn.kv_cache, meta, attn.scale, attn.kernels, written=True)
    a = attn.project("o_proj", o.view(t, attn.h * attn.d))
    post = layer.post_attention_layernorm
    x, h = triton_norm.add_rms_norm(x, a, post.weight, post.eps) or (x + a, None)
    h = post(x) if h is None else h
    weights, ids = mlp.route(h)
    ids = mlp.to_physical(ids)
    # the registered kernel's form that adds a residual (cuda_kernels), or cuda_experts with the fp8 scales
    experts = residual_experts(mlp, cuda_experts, getattr(mlp.kernels.experts, "with_residual", None))
    if experts is not None and isinstance(mlp.all2all, _TorchDistBackend) and mlp.all2all.size == 1:
        out = experts(h, ids, weights, mlp.w13, mlp.w2, mlp.act, residual=x)
        if out is not None:
            return out
    recv = mlp.all2all.dispatch(h, ids, weights)
    return x + mlp.all2all.combine(mlp.experts(recv.x, recv.topk_ids, recv.topk_weights, mlp.w13, mlp.w2, mlp.act))
