"""The default EPLB policy: hierarchical balanced packing of experts, as in DeepSeek's EPLB.

Pure functions on tensors. Given the recent load of every logical expert of every MoE
layer, ``rebalance_experts`` decides how many replicas each expert gets and where each
replica (physical expert) lives, so that every GPU carries about the same load:

1. expert groups are packed onto nodes, the same number of groups per node, heaviest
   groups first onto the lightest node (keeps a token's group-limited experts on one
   node);
2. within each node the heaviest expert (load / replicas so far) gets the next
   redundant replica, until the node has its share of physical experts;
3. the physical experts of each node are packed onto its GPUs the same way as step 1.

When the groups do not divide over the nodes, one group on one node is used (global
balancing). The tensors, shapes and results are those of DeepSeek's public
``eplb.rebalance_experts`` (github.com/deepseek-ai/EPLB) for the same inputs.
"""

from __future__ import annotations

import numpy as np
import torch

from epplat.hookspecs import Registration, hookimpl


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put the n items of each row into num_packs packs of n/num_packs items, balancing pack weights.

    Greedy: items by decreasing weight, each into the lightest pack that is not full (the
    lowest-numbered one on ties). weight: [X, n]. Returns (pack, slot), both [X, n] int64:
    the pack of each item and its position inside the pack.
    """
    rows, n = weight.shape
    if num_packs <= 0 or n % num_packs:
        raise ValueError(f"{n} items do not pack evenly into {num_packs} packs")
    per_pack = n // num_packs
    if per_pack == 1:
        return (torch.arange(n, dtype=torch.int64, device=weight.device).expand(rows, n),
                torch.zeros(rows, n, dtype=torch.int64, device=weight.device))
    order = weight.float().sort(-1, descending=True).indices.cpu()
    pack = torch.empty(rows, n, dtype=torch.int64)
    slot = torch.empty(rows, n, dtype=torch.int64)
    rows_np = weight.float().cpu().numpy()
    for r in range(rows):
        load, fill = np.zeros(num_packs, dtype=np.float32), [0] * num_packs  # float32 sums, as the reference
        row = rows_np[r]
        for item in order[r].tolist():
            p = min((q for q in range(num_packs) if fill[q] < per_pack), key=load.__getitem__)
            pack[r, item], slot[r, item] = p, fill[p]
            load[p] += row[item]
            fill[p] += 1
    return pack, slot


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grow n logical experts to num_phy physical ones, each extra replica going to the expert
    with the highest load per replica (the first such on ties). weight: [X, n].

    Returns phy2log [X, num_phy] (physical i < n is logical i), replica [X, num_phy] (which
    replica of its expert each physical one is) and count [X, n] (replicas per expert).
    """
    rows, n = weight.shape
    if num_phy < n:
        raise ValueError(f"{num_phy} physical experts cannot hold {n} logical ones")
    dev = weight.device
    phy2log = torch.arange(num_phy, dtype=torch.int64, device=dev).repeat(rows, 1)
    replica = torch.zeros(rows, num_phy, dtype=torch.int64, device=dev)
    count = torch.ones(rows, n, dtype=torch.int64, device=dev)
    row_ids = torch.arange(rows, device=dev)
    for p in range(n, num_phy):
        hot = (weight / count).max(dim=-1).indices
        phy2log[:, p] = hot
        replica[:, p] = count[row_ids, hot]
        count[row_ids, hot] += 1
    return phy2log, replica, count


def _invert(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of a permutation: out[r, perm[r, i]] = i."""
    idx = torch.arange(perm.shape[1], dtype=torch.int64, device=perm.device).expand(perm.shape)
    return torch.empty_like(perm).scatter_(1, perm, idx)


def rebalance_hierarchical(weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int,
                           num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-3 of the module docstring. weight: [L, E] float on CPU.

    Returns phy2log [L, num_phy], replica [L, num_phy] and count [L, E].
    """
    layers, num_log = weight.shape
    if num_groups <= 0 or num_log % num_groups:
        raise ValueError(f"{num_log} experts do not split into {num_groups} groups")
    if num_nodes <= 0 or num_groups % num_nodes:
        raise ValueError(f"{num_groups} expert groups do not split over {num_nodes} nodes")
    if num_gpus <= 0 or num_gpus % num_nodes:
        raise ValueError(f"{num_gpus} GPUs do not split over {num_nodes} nodes")
    if num_phy % num_gpus:
        raise ValueError(f"{num_phy} physical experts do not split over {num_gpus} GPUs")
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node, phy_per_node = num_log // num_nodes, num_phy // num_nodes
    phy_per_gpu = num_phy // num_gpus

    # 1. groups -> nodes; "node-major" logical ids (mlog) number the experts node by node
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    node, pos = balanced_packing(group_load, num_nodes)
    first = (node * groups_per_node + pos) * group_size                        # [L, groups]
    log2mlog = (first.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)    # [L, E]
    mlog2log = _invert(log2mlog)

    # 2. replicas within each node: rows are (layer, node) pairs
    node_load = weight.gather(-1, mlog2log).view(-1, log_per_node)
    phy2mlog, replica, mcount = replicate_experts(node_load, phy_per_node)

    # 3. a node's physical experts -> its GPUs, by load per replica
    phy_load = (node_load / mcount).gather(-1, phy2mlog)
    gpu, gpu_slot = balanced_packing(phy_load, num_gpus // num_nodes)
    placed2phy = _invert(gpu * phy_per_gpu + gpu_slot)   # final slot -> physical expert of step 2

    node_offset = torch.arange(0, num_log, log_per_node).view(1, -1, 1)
    placed_mlog = (phy2mlog.gather(-1, placed2phy).view(layers, num_nodes, -1) + node_offset).flatten(-2)
    phy2log = mlog2log.gather(-1, placed_mlog)
    replica = replica.gather(-1, placed2phy).view(layers, -1)
    count = mcount.view(layers, -1).gather(-1, log2mlog)
    return phy2log, replica, count


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A new placement of num_replicas physical experts on num_gpus GPUs from the load ``weight``.

    weight: [L, E] load of each logical expert per MoE layer. Returns
    phy2log [L, num_replicas] (the logical expert in each physical slot; slots are
    numbered GPU by GPU), log2phy [L, E, max replicas] (the physical slots of each
    logical expert, -1 padded) and logcnt [L, E] (replicas of each logical expert).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [layers, experts], got shape {tuple(weight.shape)}")
    layers, num_log = weight.shape
    weight = weight.float().cpu()
    if num_groups > 0 and num_nodes > 0 and num_groups % num_nodes == 0:
        phy2log, replica, count = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:   # groups cannot stay node-local: balance globally
        phy2log, replica, count = rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    width = int(count.max())
    log2phy = torch.full((layers, num_log * width), -1, dtype=torch.int64)
    log2phy.scatter_(-1, phy2log * width + replica, torch.arange(num_replicas).expand(layers, -1))
    return phy2log, log2phy.view(layers, num_log, width), count


@hookimpl
def epplat_eplb_policies():
    return [Registration("default", lambda: rebalance_experts,
                         help="DeepSeek's hierarchical balanced packing with redundant experts")]
