"""The all2all interface MoE layers call, and the expert map it works with.

A backend moves tokens to the ranks that hold their experts and back:

    recv = backend.dispatch(x, topk_ids, topk_weights)   # tokens for this rank's experts
    y = experts(recv.x, recv.topk_ids, recv.topk_weights) # weighted sum over local experts
    out = backend.combine(y)                              # [T, H] in the caller's token order

``recv.topk_ids`` are local expert indices, -1 where the expert lives elsewhere. The
single-process path is the same code with an EP group of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ExpertMap:
    """Which physical experts this EP rank holds: contiguous blocks, as vLLM places them.

    There are ``num_experts + num_redundant`` physical experts (slots), split into
    contiguous blocks over the EP ranks; when they do not divide, the first ranks hold one
    slot more (vLLM's placement). Routers turn logical expert ids into slot ids (each MoE
    layer keeps its own slot -> logical expert table), so the all2all backends only ever
    see slot ids. Without redundant experts or EPLB, slot i holds logical expert i.
    """

    num_experts: int
    ep_rank: int = 0
    ep_size: int = 1
    num_redundant: int = 0

    @property
    def num_physical(self) -> int:
        return self.num_experts + self.num_redundant

    @property
    def even(self) -> bool:
        """Whether every rank holds the same number of slots."""
        return self.num_physical % self.ep_size == 0

    def rank_range(self, rank: int) -> range:
        base, extra = divmod(self.num_physical, self.ep_size)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (rank < extra))

    @property
    def num_local(self) -> int:
        return len(self.local_ids)

    @property
    def local_ids(self) -> range:
        return self.rank_range(self.ep_rank)

    def require_even(self, what: str) -> None:
        """For backends and features that need the same slot count on every rank."""
        if not self.even:
            raise ValueError(f"{what} needs the {self.num_physical} experts to divide over the {self.ep_size} "
                             "EP ranks")

    def initial_phy2log(self) -> torch.Tensor:
        """[num_physical]: slot i holds logical expert i mod num_experts (redundant slots wrap around)."""
        return torch.arange(self.num_physical) % self.num_experts

    def global_to_local(self, device) -> torch.Tensor:
        """[num_physical] tensor: local index of each slot on this rank, -1 if not here."""
        table = torch.full((self.num_physical,), -1, dtype=torch.long)
        table[self.local_ids.start:self.local_ids.stop] = torch.arange(self.num_local)
        return table.to(device)


@dataclass
class Dispatched:
    x: torch.Tensor            # [R, H] rows for this rank's experts
    topk_ids: torch.Tensor     # [R, K] local expert ids, -1 = not on this rank
    topk_weights: torch.Tensor # [R, K]


class All2AllBackend:
    """Base class of all2all backends; one instance serves every MoE layer of a model."""

    name = "base"
    # whether the backend needs the same number of experts on every rank (a backend that places
    # slots by rank = slot // per_rank); the torch.distributed backends take uneven counts
    even_experts = True

    def __init__(self, expert_map: ExpertMap, group: Optional[object] = None, device=None):
        if self.even_experts:
            expert_map.require_even(f"the {self.name} all2all backend")
        self.expert_map = expert_map
        self.group = group
        self.device = device
        self.g2l = expert_map.global_to_local(device)

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Dispatched:
        raise NotImplementedError

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
