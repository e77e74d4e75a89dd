"""Reference expert computation in plain torch: rows grouped by expert, two grouped GEMMs.

Each token's k contributions are summed in ascending expert order starting from its
first expert, the order Hugging Face's reference loop accumulates in.
"""

from __future__ import annotations

import torch

from epplat.core.ops import TORCH, gated_act


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: list[int], offs: torch.Tensor,
                   grouped_mm=TORCH.grouped_mm) -> torch.Tensor:
    """Rows of x grouped by expert (counts[e] rows each), each group times w[e] ([in, out]): one
    ``grouped_mm`` call (the platform's Kernels.grouped_mm) or, without one, a matmul per expert."""
    out = grouped_mm(x, w, offs=offs) if grouped_mm is not None else None
    if out is not None:
        return out
    out, start = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append(x[start:start + c] @ w[e])
        start += c
    return torch.cat(out) if out else x.new_empty((0, w.shape[2]))


def capturable_experts(x, topk_ids, topk_weights, w13, w2, act) -> torch.Tensor:
    """The same sum without a host sync (CUDA graphs): all R*K rows run through two grouped
    GEMMs with device-side group offsets; rows of other ranks' experts sort last and are masked."""
    rows, k = topk_ids.shape
    num_experts = w13.shape[0]
    ids, perm = topk_ids.sort(dim=1)
    weights = topk_weights.gather(1, perm).reshape(-1)
    key = torch.where(ids < 0, num_experts, ids).reshape(-1)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    offs = counts[:num_experts].cumsum(0, dtype=torch.int32)
    h = gated_act(torch._grouped_mm(x.index_select(0, order // k), w13, offs=offs), act)
    h = torch._grouped_mm(h, w2, offs=offs)
    valid = (key.index_select(0, order) < num_experts)[:, None]
    h = torch.where(valid, h * weights.index_select(0, order)[:, None].to(x.dtype), 0)
    # one reduction over k (the reference's expert-order chain of adds costs k-1 kernels)
    return torch.empty_like(h).index_copy_(0, order, h).view(rows, k, -1).sum(dim=1)


def reference_experts(x, topk_ids, topk_weights, w13, w2, act, grouped_mm=TORCH.grouped_mm) -> torch.Tensor:
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]) over local ids >= 0.

    x: [R, H]; topk_ids/topk_weights: [R, K]; w13: [E, H, 2I]; w2: [E, I, H].
    """
    rows, k = topk_ids.shape
    num_experts = w13.shape[0]
    ids, perm = topk_ids.sort(dim=1)                  # ascending experts per token (-1 first)
    weights = topk_weights.gather(1, perm).reshape(-1)
    key = ids.reshape(-1).clone()
    key[key < 0] = num_experts
    order = torch.argsort(key, stable=True)
    counts_t = torch.bincount(key, minlength=num_experts + 1)
    counts = counts_t.tolist()
    valid = order[: rows * k - counts[num_experts]]
    offs = counts_t[:num_experts].cumsum(0).to(torch.int32)
    h = gated_act(grouped_matmul(x.index_select(0, valid // k), w13, counts[:num_experts], offs, grouped_mm), act)
    h = grouped_matmul(h, w2, counts[:num_experts], offs, grouped_mm) * weights.index_select(0, valid)[:, None].to(x.dtype)
    buf = x.new_zeros((rows * k, x.shape[1]))
    buf.index_copy_(0, valid, h)
    buf = buf.view(rows, k, x.shape[1])       # rows may be 0 (an EP rank that received no token)
    out = buf[:, 0]
    for j in range(1, k):
        out = out + buf[:, j]
    return out
