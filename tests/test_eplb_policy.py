"""The default EPLB policy (epplat.core.moe.eplb): shapes, invariants, fallbacks, bad sizes, and
equality with DeepSeek's reference implementation on fixed inputs."""

from __future__ import annotations

import pytest
import torch

from epplat.core.moe.eplb import balanced_packing, rebalance_experts, replicate_experts
from epplat.plugins import registry


def _check_invariants(weight, num_phy, num_gpus, phy2log, log2phy, logcnt):
    layers, num_log = weight.shape
    assert phy2log.shape == (layers, num_phy) and logcnt.shape == (layers, num_log)
    assert log2phy.shape == (layers, num_log, int(logcnt.max()))
    for dt in (phy2log, log2phy, logcnt):
        assert dt.dtype == torch.int64
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == num_phy).all()     # every expert keeps a replica
    for layer in range(layers):
        for e in range(num_log):
            slots = log2phy[layer, e]
            live = slots[slots >= 0]
            assert len(live) == logcnt[layer, e] and (slots[len(live):] == -1).all()
            assert (phy2log[layer, live] == e).all()                         # log2phy inverts phy2log
        assert sorted(log2phy[layer][log2phy[layer] >= 0].tolist()) == list(range(num_phy))
    per_gpu = num_phy // num_gpus
    return per_gpu


def test_shapes_inverse_and_coverage_on_random_loads():
    g = torch.Generator().manual_seed(3)
    for layers, num_log, num_phy, groups, nodes, gpus in [(3, 16, 20, 4, 2, 4), (2, 8, 8, 2, 1, 2),
                                                          (4, 12, 18, 3, 1, 6), (1, 32, 48, 8, 4, 8)]:
        w = torch.randint(0, 500, (layers, num_log), generator=g)
        out = rebalance_experts(w, num_phy, groups, nodes, gpus)
        _check_invariants(w, num_phy, gpus, *out)


def test_redundant_replicas_go_to_the_hottest_experts_and_balance_gpus():
    w = torch.tensor([[400.0, 100, 100, 100, 100, 100, 100, 100]])
    phy2log, _, logcnt = rebalance_experts(w, 12, 1, 1, 4)
    assert logcnt[0, 0] == 5 and (logcnt[0, 1:] == 1).all()
    per_gpu = (w[0][phy2log[0]] / logcnt[0][phy2log[0]]).view(4, 3).sum(-1)
    assert per_gpu.max() / per_gpu.mean() < 1.05
    # without redundant experts the same load cannot be balanced: one GPU holds expert 0 whole
    phy2log, _, _ = rebalance_experts(w, 8, 1, 1, 4)
    assert (w[0][phy2log[0]].view(4, 2).sum(-1)).max() >= 500


def test_groups_that_do_not_split_over_nodes_fall_back_to_global_balancing():
    w = torch.tensor([[5.0, 80, 3, 12, 40, 9, 1, 30]])
    fallback = rebalance_experts(w, 10, 3, 2, 2)      # 3 groups over 2 nodes: global policy
    assert all(torch.equal(a, b) for a, b in zip(fallback, rebalance_experts(w, 10, 1, 1, 2)))


@pytest.mark.parametrize("args, match", [
    ((torch.ones(2, 8), 10, 2, 1, 4), "do not split over 4 GPUs"),
    ((torch.ones(2, 8), 6, 1, 1, 2), "cannot hold 8"),
    ((torch.ones(2, 8), 8, 3, 1, 2), "do not split into 3 groups"),
    ((torch.ones(2, 8), 8, 2, 2, 3), "do not split over 2 nodes"),
    ((torch.ones(8), 8, 1, 1, 2), r"\[layers, experts\]"),
])
def test_bad_sizes_raise(args, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(*args)


def test_building_blocks():
    pack, slot = balanced_packing(torch.tensor([[9.0, 1, 5, 4]]), 2)   # 9 | 5, 4 (pack 1 full) | 1
    assert pack.tolist() == [[0, 0, 1, 1]] and slot.tolist() == [[0, 1, 0, 1]]
    with pytest.raises(ValueError):
        balanced_packing(torch.ones(1, 5), 2)
    phy2log, replica, count = replicate_experts(torch.tensor([[6.0, 1, 2]]), 5)
    assert phy2log.tolist() == [[0, 1, 2, 0, 0]] and replica.tolist() == [[0, 0, 0, 1, 2]]
    assert count.tolist() == [[3, 1, 1]]


# Expected tensors: the output of DeepSeek's reference eplb.rebalance_experts
# (github.com/deepseek-ai/EPLB, eplb.py at commit d52c72d) run on these inputs with torch 2.13 on CPU.
# The first case is the example of its README (2 layers, 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs).
REFERENCE = [
    (torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                   [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]), (16, 4, 2, 8),
     [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]],
     [[[12, -1], [15, 13], [11, -1], [6, -1], [7, 5], [0, 2], [1, -1], [3, -1], [4, -1], [9, -1], [8, 10],
       [14, -1]],
      [[13, -1], [15, 11], [8, -1], [14, -1], [9, -1], [10, 12], [2, 4], [0, -1], [6, 3], [7, -1], [1, -1],
       [5, -1]]],
     [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]),
    (torch.tensor([[5.0, 80, 3, 12, 40, 9, 1, 30]]), (10, 3, 2, 2),
     [[4, 1, 3, 5, 2, 7, 1, 1, 0, 6]],
     [[[8, -1, -1], [6, 1, 7], [4, -1, -1], [2, -1, -1], [0, -1, -1], [3, -1, -1], [9, -1, -1], [5, -1, -1]]],
     [[1, 3, 1, 1, 1, 1, 1, 1]]),
    (torch.tensor([[10.0, 200, 30, 45, 5, 60, 70, 15], [1.0, 2, 3, 4, 500, 6, 7, 8]]), (12, 2, 1, 4),
     [[5, 6, 7, 1, 1, 4, 1, 3, 0, 1, 6, 2], [4, 4, 0, 4, 7, 1, 4, 6, 2, 4, 5, 3]],
     [[[8, -1, -1, -1, -1], [3, 6, 9, 4, -1], [11, -1, -1, -1, -1], [7, -1, -1, -1, -1], [5, -1, -1, -1, -1],
       [0, -1, -1, -1, -1], [10, 1, -1, -1, -1], [2, -1, -1, -1, -1]],
      [[2, -1, -1, -1, -1], [5, -1, -1, -1, -1], [8, -1, -1, -1, -1], [11, -1, -1, -1, -1], [0, 3, 6, 9, 1],
       [10, -1, -1, -1, -1], [7, -1, -1, -1, -1], [4, -1, -1, -1, -1]]],
     [[1, 4, 1, 1, 1, 1, 2, 1], [1, 1, 1, 1, 5, 1, 1, 1]]),
]


@pytest.mark.parametrize("weight, args, phy2log, log2phy, logcnt", REFERENCE)
def test_equals_deepseek_reference(weight, args, phy2log, log2phy, logcnt):
    out = rebalance_experts(weight, *args)
    assert [t.tolist() for t in out] == [phy2log, log2phy, logcnt]


def test_registered_as_the_default_policy():
    reg = registry().get("eplb_policy", "default")
    assert reg.plugin == "epplat" and reg.load() is rebalance_experts


def test_moves_keep_experts_in_place_and_copy_locally_first():
    from epplat.core.moe.eplb_transfer import keep_in_place, plan_moves
    old = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1]])          # 2 ranks x 5 slots
    new = torch.tensor([[3, 0, 0, 2, 1, 7, 4, 5, 6, 0]])
    aligned = keep_in_place(old, new, 5)
    assert aligned.tolist() == [[0, 1, 2, 3, 0, 5, 6, 7, 0, 4]]   # same experts per rank, fewest changes
    moves = plan_moves(old, aligned, 5)
    # slot 4 gets expert 0 from slot 0 (same rank); slot 9 gets expert 4 from rank 0's slot 4
    assert [(m.src, m.dst) for m in moves] == [(0, 4), (4, 9)]
    assert len(plan_moves(old, new, 5)) == 10                    # without the alignment: every slot
    assert plan_moves(old, old, 5) == []
