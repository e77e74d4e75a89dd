"""A decoder layer of a decode step on cuda in fewer launches than the modules' 19 (Kernels.decoder_layer).

At batch 1 a layer's GEMMs read ~113 MB of weights (Qwen3-30B-A3B) in ~26 us at HBM speed, while
each small kernel between them (norms, rotary, KV write, the attention merge, residual adds,
routing) costs 1.5-2.5 us, mostly launch latency. For a batch of single-token decodes through a
plain MoE layer (softmax top-k routing, no TP, the attention with a power-of-two head dim and
block size) this runs:

1. the input RMSNorm (triton_norm);
2. the qkv GEMM: up to triton_gemv.MAX_ROWS rows the Triton GEMV, else ``project`` (cuBLAS or fp8);
3. q/k norm + rotary + KV-cache write (triton_rope_kv);
4. decode attention with its merge in the same launch (triton_attention);
5. the o_proj GEMM as the qkv one;
6. residual add + RMSNorm in one launch (triton_norm.add_rms_norm);
7. the router GEMM (the GEMV up to MAX_ROWS rows, as the modules' F.linear above) and the softmax top-k
   kernel (a one-launch router with the top-k inside, tried on the H200, ran 8 programs for a 512 KB gate
   read: 23.5 us a layer at batch 1 against ~10 us, and was removed);
8-10. the experts' gate/up, down and sum kernels, the sum adding the residual (triton_moe).

Every Triton kernel of these can launch as a dependent of the one before (pdl: off until measured).

Every step rounds where the module it replaces rounds, so the tokens are those of the module
path up to the float32 order of sums inside a kernel. Anything else (prefill or mixed steps,
other layer types, TP, an all2all across ranks) returns None and the modules run as usual.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from epplat.core.model.decoder import Attention, DecoderLayer
from epplat.core.moe.all2all_torch import _TorchDistBackend
from epplat.core.moe.layer import FusedMoE
from epplat.platforms.cuda import fp8, triton_gemv, triton_norm, triton_rope_kv
from epplat.platforms.cuda import pdl as _pdl
from epplat.platforms.cuda.triton_attention import decode_attention
from epplat.platforms.cuda.triton_moe import MAX_ASSIGNMENTS, fused_topk, triton_experts
from epplat.platforms.cuda.triton_norm import rms_norm

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _pow2(n: int) -> bool:
    return n >= 16 and not n & (n - 1)


def _eligible(layer: DecoderLayer) -> bool:
    attn, mlp = layer.self_attn, layer.mlp
    if type(attn) is not Attention or type(mlp) is not FusedMoE or mlp.routing is not None:
        return False
    if layer.ps.tp_size > 1 or mlp.tp_size > 1 or layer.kernels.linear is not None or attn.kv_cache is None:
        return False
    dtype = layer.input_layernorm.weight.dtype
    norms = [layer.input_layernorm, layer.post_attention_layernorm] + (
        [attn.q_norm, attn.k_norm] if attn.q_norm is not None else [])
    k_cache, v_cache = attn.kv_cache
    return (dtype in _DTYPES and all(n.weight.dtype == dtype for n in norms) and mlp.gate.dtype == dtype
            and k_cache.dtype == v_cache.dtype == dtype and k_cache.is_contiguous() and v_cache.is_contiguous()
            and _pow2(attn.d) and _pow2(k_cache.shape[1]) and triton_rope_kv.takes(attn.h, attn.kvh, attn.d)
            and attn.h % attn.kvh == 0)


def residual_experts(mlp: FusedMoE, kernel, registered):
    """The layer's expert call in a form that takes ``residual=``: ``registered`` where the layer runs its
    kernels record's experts, ``kernel`` with the fp8 method's scales where it runs fp8 experts; None for
    other expert functions (those run, then the add)."""
    fn = mlp.experts
    if fn == mlp.torch_experts:
        return registered
    if isinstance(fn, functools.partial) and fn.func is fp8._fp8_experts:
        return functools.partial(kernel, **fn.keywords)
    return None


def _project(module, name: str, x: torch.Tensor, pdl: bool) -> torch.Tensor:
    """``module.project(name, x)``, through the Triton GEMV where it takes a plain unbiased weight and a few rows
    (fp8 modules bring their own ``project``)."""
    out = None
    if "project" not in vars(module) and getattr(module, name + "_bias", None) is None:
        out = triton_gemv.gemv(x, getattr(module, name), pdl=pdl)
    return module.project(name, x) if out is None else out


def eligible(layer: DecoderLayer) -> bool:
    """Whether the layer's shapes and parts are those the fused layers take (cached on the layer until its
    all2all or KV cache changes)."""
    cached = getattr(layer, "_cuda_fused_ok", None)
    if cached is None or cached[0] is not layer.mlp.all2all or cached[1] is not layer.self_attn.kv_cache:
        cached = layer._cuda_fused_ok = (layer.mlp.all2all, layer.self_attn.kv_cache, _eligible(layer))
    return cached[2]


def decode_layer(layer: DecoderLayer, x: torch.Tensor, positions: torch.Tensor, meta) -> Optional[torch.Tensor]:
    """``layer(x, positions, meta)`` for a batch of single-token decodes; None when it does not apply."""
    t = x.shape[0]
    if meta.prefills or not eligible(layer) or meta.num_decodes != t or t == 0 or x.dtype not in _DTYPES \
            or x.dtype != layer.input_layernorm.weight.dtype:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    k_cache, v_cache = attn.kv_cache
    x = x.contiguous()
    pdl = _pdl.on(x.device)
    h = rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.eps, pdl)
    qkv = _project(attn, "qkv", h, pdl)
    norm = attn.q_norm is not None
    q = triton_rope_kv.qk_norm_rope_kv(qkv, attn.h, attn.kvh, attn.d, attn.q_norm.weight if norm else None,
                                       attn.k_norm.weight if norm else None,
                                       attn.q_norm.eps if norm else 0.0, positions, attn.rope.cos, attn.rope.sin,
                                       k_cache, v_cache, meta.slot_mapping, pdl)
    o = decode_attention(q, k_cache, v_cache, meta.decode_tables, meta.decode_lens, attn.scale, pdl=pdl)
    a = _project(attn, "o_proj", o.view(t, attn.h * attn.d), pdl)
    post = layer.post_attention_layernorm
    x, h = triton_norm.add_rms_norm(x, a, post.weight, post.eps, pdl) or (x + a, None)
    h = post(x) if h is None else h
    logits = triton_gemv.gemv(h, mlp.gate, pdl=pdl) if mlp.kernels.route is fused_topk else None
    weights, ids = mlp.route(h) if logits is None else fused_topk(logits, mlp.top_k, mlp.renormalize, h.dtype, pdl)
    ids = mlp.to_physical(ids)
    # the masked Triton kernels, bf16/fp32 or fp8
    experts = residual_experts(mlp, triton_experts, triton_experts if mlp.kernels.experts is not None else None)
    if (experts is not None and isinstance(mlp.all2all, _TorchDistBackend) and mlp.all2all.size == 1
            and ids.numel() <= MAX_ASSIGNMENTS):
        out = experts(h, ids, weights, mlp.w13, mlp.w2, mlp.act, residual=x, pdl=pdl)
        if out is not None:
            return out
    recv = mlp.all2all.dispatch(h, ids, weights)
    return x + mlp.all2all.combine(mlp.experts(recv.x, recv.topk_ids, recv.topk_weights, mlp.w13, mlp.w2, mlp.act))
