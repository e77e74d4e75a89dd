"""Reference expert computation in plain torch: rows grouped by expert, two grouped GEMMs.

Each token's k contributions are summed in ascending expert order starting from its
first expert, the order Hugging Face's reference loop accumulates in.
"""

from __future__ import annotations

import torch

from epplat.core.model.layers import gated_act

_HAS_GROUPED = hasattr(torch, "_grouped_mm")


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: list[int], offs: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert (counts[e] rows each), each group times w[e] ([in, out])."""
    if _HAS_GROUPED and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
        return torch._grouped_mm(x, w, offs=offs)
    out, start = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append(x[start:start + c] @ w[e])
        start += c
    return torch.cat(out) if out else x.new_empty((0, w.shape[2]))


def reference_experts(x, topk_ids, topk_weights, w13, w2, act) -> torch.Tensor:
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
    h = gated_act(grouped_matmul(x.index_select(0, valid // k), w13, counts[:num_experts], offs), act)
    h = grouped_matmul(h, w2, counts[:num_experts], offs) * weights.index_select(0, valid)[:, None].to(x.dtype)
    buf = x.new_zeros((rows * k, x.shape[1]))
    buf.index_copy_(0, valid, h)
    buf = buf.view(rows, k, -1)
    out = buf[:, 0]
    for j in range(1, k):
        out = out + buf[:, j]
    return out
