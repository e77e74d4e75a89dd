"""The MoE layer: router -> all2all dispatch -> local experts -> all2all combine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epplat.core.moe.all2all import All2AllBackend
from epplat.core.moe.experts import reference_experts


class FusedMoE(nn.Module):
    """Top-k softmax routing over ``num_experts``; holds only this EP rank's experts.

    Weights: ``gate`` [E, H] (router, replicated); ``w13`` [E_local, H, 2I] (gate and up
    projections side by side) and ``w2`` [E_local, I, H], both stored input-major
    (transposed from the checkpoint) because skinny GEMMs stream them faster.
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int,
                 renormalize: bool, act, all2all: All2AllBackend, dtype, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.top_k, self.renormalize, self.act = top_k, renormalize, act
        self.all2all = all2all
        self.expert_map = all2all.expert_map
        n_local = self.expert_map.num_local
        if intermediate % tp_size:
            raise ValueError(f"expert width {intermediate} does not split over {tp_size} TP ranks")
        self.tp_size = tp_size
        intermediate //= tp_size                   # without EP, TP ranks hold a slice of every expert
        self.slice = slice(tp_rank * intermediate, (tp_rank + 1) * intermediate)
        self.intermediate = intermediate
        self.gate = nn.Parameter(torch.empty(num_experts, hidden, dtype=dtype), requires_grad=False)
        self.w13 = nn.Parameter(torch.empty(n_local, hidden, 2 * intermediate, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(n_local, intermediate, hidden, dtype=dtype), requires_grad=False)

    def route(self, x: torch.Tensor):
        probs = torch.softmax(F.linear(x, self.gate).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        recv = self.all2all.dispatch(x, ids, weights)
        y = reference_experts(recv.x, recv.topk_ids, recv.topk_weights, self.w13, self.w2, self.act)
        return self.all2all.combine(y)

    def load_expert_weight(self, expert: int, proj: str, tensor: torch.Tensor) -> bool:
        """Copy one checkpoint tensor (proj: gate | up | down) of a global expert; False if not ours."""
        ids = self.expert_map.local_ids
        if expert not in ids:
            return False
        e, i = expert - ids.start, self.intermediate
        if proj == "gate":
            self.w13.data[e, :, :i].copy_(tensor[self.slice].t())
        elif proj == "up":
            self.w13.data[e, :, i:].copy_(tensor[self.slice].t())
        else:
            self.w2.data[e].copy_(tensor[:, self.slice].t())
        return True
