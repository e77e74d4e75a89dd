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
    """Which logical experts this EP rank holds: contiguous blocks, as vLLM places them."""

    num_experts: int
    ep_rank: int = 0
    ep_size: int = 1

    def __post_init__(self):
        if self.num_experts % self.ep_size:
            raise ValueError(f"{self.num_experts} experts do not divide over {self.ep_size} EP ranks")

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def local_ids(self) -> range:
        return range(self.ep_rank * self.num_local, (self.ep_rank + 1) * self.num_local)

    def global_to_local(self, device) -> torch.Tensor:
        """[num_experts] tensor: local index of each global expert on this rank, -1 if not here."""
        table = torch.full((self.num_experts,), -1, dtype=torch.long)
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

    def __init__(self, expert_map: ExpertMap, group: Optional[object] = None, device=None):
        self.expert_map = expert_map
        self.group = group
        self.device = device
        self.g2l = expert_map.global_to_local(device)

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Dispatched:
        raise NotImplementedError

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
