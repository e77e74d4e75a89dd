"""The MoE layer: router -> all2all dispatch -> local experts -> all2all combine."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from epplat.core.moe.all2all import All2AllBackend
from epplat.core.moe.experts import reference_experts
from epplat.core.moe.routing import GroupedTopK
from epplat.core.ops import TORCH, Kernels, linear


class FusedMoE(nn.Module):
    """Top-k softmax routing over ``num_experts``; holds only this EP rank's experts.

    Weights: ``gate`` [E, H] (router, replicated); ``w13`` [E_local, H, 2I] (gate and up
    projections side by side) and ``w2`` [E_local, I, H], both stored input-major
    (transposed from the checkpoint) because skinny GEMMs stream them faster. E_local
    counts physical experts (slots): with redundant experts a logical expert may sit in
    several slots. ``phy2log`` [slots] is this layer's placement; ``log2phy`` [E, R] and
    ``logcnt`` [E] (None while slot i holds expert i) let the router pick a replica;
    ``load`` [slots], when EPLB is on, counts the tokens routed to each slot.
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int,
                 renormalize: bool, act, all2all: All2AllBackend, dtype, tp_rank: int = 0, tp_size: int = 1,
                 routing: Optional[GroupedTopK] = None, kernels: Kernels = TORCH):
        super().__init__()
        self.kernels = kernels
        self.routing = routing   # DeepSeek-style selection (epplat.core.moe.routing); None: top-k softmax
        self.top_k, self.renormalize, self.act = top_k, renormalize, act
        self.all2all = all2all
        self.expert_map = all2all.expert_map
        n_local = self.expert_map.num_local
        self.tp_size = tp_size
        intermediate //= tp_size                   # without EP, TP ranks hold a slice of every expert
        self.slice = slice(tp_rank * intermediate, (tp_rank + 1) * intermediate)
        self.intermediate = intermediate
        self.gate = nn.Parameter(torch.empty(num_experts, hidden, dtype=dtype), requires_grad=False)
        self.w13 = nn.Parameter(torch.empty(n_local, hidden, 2 * intermediate, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(n_local, intermediate, hidden, dtype=dtype), requires_grad=False)
        # the router's e_score_correction_bias [E] (noaux_tc), loaded with the weights
        self.bias = (nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)
                     if routing is not None and routing.use_bias else None)
        self.experts = self.torch_experts      # the expert GEMMs; a quantization method may swap in its own
        self.log2phy: Optional[torch.Tensor] = None
        self.logcnt: Optional[torch.Tensor] = None
        self.load: Optional[torch.Tensor] = None
        self.set_placement(self.expert_map.initial_phy2log())

    def set_placement(self, phy2log: torch.Tensor) -> None:
        """Adopt a slot -> logical expert table (the weights must already match it)."""
        self.phy2log = phy2log.to(torch.long).cpu()
        if torch.equal(self.phy2log, torch.arange(len(self.phy2log), device="cpu")):
            self.log2phy = self.logcnt = None        # identity: routing needs no table
            return
        dev = self.gate.device
        self.log2phy, self.logcnt = (t.to(dev) for t in replica_tables(self.phy2log, self.gate.shape[0]))

    def local_logical_ids(self) -> list[int]:
        """The logical expert in each of this rank's slots."""
        ids = self.expert_map.local_ids
        return self.phy2log[ids.start:ids.stop].tolist()

    def to_physical(self, ids: torch.Tensor) -> torch.Tensor:
        """Logical expert ids [T, K] -> slot ids: the (t*K + k + ep_rank)-th replica, round robin,
        spreads a hot expert's tokens over its replicas. Counts tokens per slot when EPLB is on."""
        if self.log2phy is not None:
            n = torch.arange(ids.numel(), device=ids.device).view_as(ids) + self.expert_map.ep_rank
            ids = self.log2phy[ids, n % self.logcnt[ids]]
        if self.load is not None:
            flat = ids.reshape(-1)
            self.load.index_add_(0, flat, torch.ones_like(flat, dtype=self.load.dtype))
        return ids

    def torch_experts(self, x, topk_ids, topk_weights, w13, w2, act) -> torch.Tensor:
        """The platform's expert kernel where it takes the input, else reference_experts."""
        kernel = self.kernels.experts
        out = kernel(x, topk_ids, topk_weights, w13, w2, act) if kernel is not None else None
        if out is None:
            out = reference_experts(x, topk_ids, topk_weights, w13, w2, act, self.kernels.grouped_mm)
        return out

    def route(self, x: torch.Tensor):
        logits = linear(x, self.gate, None, self.kernels)
        if self.routing is not None:
            weights, ids = self.routing(logits, self.bias)
            return weights.to(x.dtype), ids
        kernel = self.kernels.route
        out = kernel(logits, self.top_k, self.renormalize, x.dtype) if kernel is not None else None
        if out is not None:
            return out
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        recv = self.all2all.dispatch(x, self.to_physical(ids), weights)
        y = self.experts(recv.x, recv.topk_ids, recv.topk_weights, self.w13, self.w2, self.act)
        return self.all2all.combine(y)

    def load_expert_weight(self, expert: int, proj: str, tensor: torch.Tensor) -> bool:
        """Copy one checkpoint tensor (proj: gate | up | down) of a logical expert into every local
        slot holding it; False if none does."""
        slots = [s for s, e in enumerate(self.local_logical_ids()) if e == expert]
        i = self.intermediate
        for e in slots:
            if proj == "gate":
                self.w13.data[e, :, :i].copy_(tensor[self.slice].t())
            elif proj == "up":
                self.w13.data[e, :, i:].copy_(tensor[self.slice].t())
            else:
                self.w2.data[e].copy_(tensor[:, self.slice].t())
        return bool(slots)


def replica_tables(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From a slot -> logical table [P]: log2phy [E, max replicas] (slots in ascending order,
    -1 padded) and logcnt [E]."""
    logcnt = torch.bincount(phy2log, minlength=num_experts)
    if (logcnt == 0).any():
        raise ValueError(f"placement leaves logical expert {int((logcnt == 0).nonzero()[0])} without a slot")
    order = torch.argsort(phy2log, stable=True)
    rank = torch.arange(len(phy2log)) - (logcnt.cumsum(0) - logcnt)[phy2log[order]]
    log2phy = torch.full((num_experts, int(logcnt.max())), -1, dtype=torch.long)
    log2phy[phy2log[order], rank] = order
    return log2phy, logcnt
