"""A whole decoder layer of a CPU decode step in one C call (``decode_layer`` in kernels.c).

A decode step of a small MoE model on CPU spends a fifth of its time in Python between the
kernels (module calls, views, wrapper checks, allocations). For the plain case, a float32
MoE layer on one process with no quantization, EPLB or TP, and a batch of single-token
decodes within the C linear's row limit, :func:`decode_layer` runs the same C kernels in
the same order as the modules would (so the tokens are the same bits) without returning
to Python; anything else returns None and the modules run as usual.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from epplat.core.model.decoder import DecoderLayer, Projections
from epplat.core.moe.all2all_torch import _TorchDistBackend
from epplat.core.moe.layer import FusedMoE
from epplat.platforms.cpu import cpu_kernels


def _eligible(layer: DecoderLayer) -> bool:
    attn, mlp = layer.self_attn, layer.mlp
    if not isinstance(mlp, FusedMoE) or layer.ps.tp_size > 1 or mlp.tp_size > 1:
        return False
    if not isinstance(mlp.all2all, _TorchDistBackend) or mlp.all2all.size != 1:
        return False        # another backend (a plugin's) must see its dispatch and combine
    if mlp.experts != mlp.torch_experts or mlp.act is not F.silu:
        return False
    if "project" in vars(attn) or type(attn).project is not Projections.project:
        return False        # a quantization method runs the projections
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    norms += [attn.q_norm, attn.k_norm] if attn.q_norm is not None else []
    tensors = [attn.qkv, attn.o_proj, mlp.gate, mlp.w13, mlp.w2, attn.rope.cos, attn.rope.sin]
    tensors += [n.weight for n in norms] + ([attn.qkv_bias] if attn.qkv_bias is not None else [])
    hidden, width = mlp.w13.shape[1], mlp.w13.shape[2] // 2
    return (all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
            and len({n.eps for n in norms}) == 1 and mlp.top_k <= 64
            and hidden % 16 == 0 and width % 16 == 0 and attn.d % 16 == 0 and attn.h % attn.kvh == 0)


def decode_layer(layer: DecoderLayer, x: torch.Tensor, positions: torch.Tensor, meta) -> Optional[torch.Tensor]:
    """``layer(x, positions, meta)`` for a batch of single-token decodes; None when it does not apply."""
    cached = getattr(layer, "_cpu_fused_ok", None)
    if cached is None or cached[0] is not layer.mlp.all2all:     # elastic EP gives the layer a new backend
        cached = layer._cpu_fused_ok = (layer.mlp.all2all, _eligible(layer))
    ok = cached[1]
    t = x.shape[0]
    if (not ok or meta.prefills or meta.num_decodes != t or not 0 < t <= cpu_kernels.MAX_LINEAR_ROWS
            or x.dtype != torch.float32 or layer.mlp.load is not None or layer.mlp.log2phy is not None):
        return None
    lib = cpu_kernels.load()
    attn, mlp = layer.self_attn, layer.mlp
    k_cache, v_cache = attn.kv_cache
    hidden, experts, width = x.shape[1], mlp.gate.shape[0], mlp.intermediate
    tables, lens = meta.decode_tables, meta.decode_lens
    threads = cpu_kernels.THREADS
    scratch = torch.empty(lib.decode_layer_floats(t, hidden, attn.h, attn.kvh, attn.d, experts, mlp.top_k, width,
                                                  tables.shape[1] * k_cache.shape[1], threads), dtype=torch.float32)
    out = x.clone()
    qn = attn.q_norm.weight.data_ptr() if attn.q_norm is not None else None
    kn = attn.k_norm.weight.data_ptr() if attn.k_norm is not None else None
    lib.decode_layer(out.data_ptr(), t, hidden, layer.input_layernorm.weight.data_ptr(),
                     layer.post_attention_layernorm.weight.data_ptr(), layer.input_layernorm.eps,
                     attn.qkv.data_ptr(), attn.qkv_bias.data_ptr() if attn.qkv_bias is not None else None,
                     attn.h, attn.kvh, attn.d, qn, kn, positions.data_ptr(), attn.rope.cos.data_ptr(),
                     attn.rope.sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), meta.slot_mapping.data_ptr(),
                     tables.data_ptr(), lens.data_ptr(), k_cache.shape[1], tables.shape[1], attn.scale,
                     attn.o_proj.data_ptr(), mlp.gate.data_ptr(), experts, mlp.top_k, int(mlp.renormalize),
                     mlp.w13.data_ptr(), mlp.w2.data_ptr(), width, scratch.data_ptr(), threads)
    return out
