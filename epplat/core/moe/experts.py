"""Reference expert computation in plain torch: tokens sorted by expert, one GEMM pair each."""

from __future__ import annotations

import torch

from epplat.core.model.layers import gated_act


def reference_experts(x, topk_ids, topk_weights, w13, w2, act) -> torch.Tensor:
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]) for local ids >= 0.

    x: [R, H]; topk_ids/topk_weights: [R, K]; w13: [E, 2I, H]; w2: [E, H, I].
    Experts are visited in ascending order and accumulated with index_add, like
    Hugging Face's reference loop, so float32 results agree with it.
    """
    out = torch.zeros_like(x)
    num_experts = w13.shape[0]
    flat = topk_ids.reshape(-1)
    ids = torch.where(flat < 0, num_experts, flat)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_experts + 1)[:num_experts].tolist()
    k = topk_ids.shape[1]
    tok = order // k
    weights = topk_weights.reshape(-1)[order]
    start = 0
    for e, c in enumerate(counts):
        if not c:
            continue
        t = tok[start:start + c]
        h = gated_act(x[t] @ w13[e].t(), act) @ w2[e].t()
        out.index_add_(0, t, h * weights[start:start + c, None].to(h.dtype))
        start += c
    return out
