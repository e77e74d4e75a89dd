"""Elastic EP: the expert placement for a new EP size, and the moves that reach it.

Every EP rank keeps its number of slots through a scale, so there are slots per rank x
new EP size physical experts, and the redundant ones are those beyond the logical
experts (vLLM's rule); a size whose slots cannot hold every logical expert is refused.
The EPLB policy places the experts from the recent load (the EPLB window summed over
the group, plus one token each so unseen experts still spread; a flat load without
EPLB). Only slots whose expert changes get weights, rank to rank (eplb_transfer): when
scaling down the experts leave the departing ranks before the world shrinks; when
scaling up the new ranks join first, holding the experts they loaded (slot i -> expert
i mod E), and the moves run in the new world.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from epplat.core.moe import eplb_transfer
from epplat.core.moe.eplb_state import run_policy
from epplat.core.moe.layer import FusedMoE


def moe_layers(model) -> list[FusedMoE]:
    return [layer.mlp for layer in model.layers if isinstance(layer.mlp, FusedMoE)]


def placement(layers: list[FusedMoE]) -> torch.Tensor:
    """[L, slots]: the logical expert in every slot of every MoE layer."""
    return torch.stack([layer.phy2log for layer in layers])


def _logical_load(layers: list[FusedMoE], eplb, group) -> torch.Tensor:
    """[L, E] tokens routed to each logical expert over the EPLB window, summed over ``group``, plus one."""
    num_experts = layers[0].gate.shape[0]
    load = torch.zeros(len(layers), num_experts, dtype=torch.float64)
    if eplb is not None:
        window = eplb.window.sum(0, dtype=torch.int64).cpu().double()
        load.scatter_add_(1, placement(layers), window)
    if group is not None:
        dist.all_reduce(load, group=group)
    return load + 1


def new_placement(layers: list[FusedMoE], eplb, policy, num_groups: int, current: torch.Tensor, ep_size: int,
                  slots_per_rank: int, group) -> torch.Tensor:
    """The policy's placement [L, slots_per_rank x ep_size], decided on rank 0 of ``group`` (a gloo group of
    every EP rank) and broadcast; ``current`` [L, any] is the placement it starts from."""
    logical = _logical_load(layers, eplb, group)
    new = torch.empty(len(layers), slots_per_rank * ep_size, dtype=torch.long)
    if dist.get_rank(group) == 0:
        new = run_policy(policy, logical, slots_per_rank * ep_size, num_groups, 1, ep_size, current)
    dist.broadcast(new, src=dist.get_global_rank(group, 0), group=group)
    return new


def move_experts(layers: list[FusedMoE], old: torch.Tensor, new: torch.Tensor, rank: int, slots_per_rank: int,
                 group) -> tuple[torch.Tensor, list, list]:
    """This rank's part of the moves from ``old`` to ``new`` (both [L, P], the same slot numbering; -1 in
    ``new``: a departing slot). Returns (new with each rank's kept experts in place, moves, staged payloads)."""
    new = eplb_transfer.keep_in_place(old, new, slots_per_rank)
    moves = eplb_transfer.plan_moves(old, new, slots_per_rank)
    return new, moves, eplb_transfer.exchange(moves, layers, rank, slots_per_rank, group)


def initial_placement(num_layers: int, first_slot: int, last_slot: int, num_experts: int) -> torch.Tensor:
    """[L, last_slot - first_slot]: what a new rank's slots hold after loading (ExpertMap.initial_phy2log)."""
    return (torch.arange(first_slot, last_slot) % num_experts).expand(num_layers, -1).clone()
