"""Elastic EP in an engine process: a DP rank's part of a scale (POST /scale_elastic_ep).

Every driver of the current world receives the scale call and, at one step they agree on
(core_proc's waves), runs ``rescale``, and so do its TP workers (the driver sends them a
Rescale plan); every process of a new rank runs ``join`` after loading its model and
sizing its KV cache from the running ranks' block count. Scaling down, the experts move
off the departing ranks over the old world, the departing ranks leave, and the others
form the smaller world. Scaling up, the staying and the new ranks form the larger world,
rank 0 tells the new ones the current placement and wave number, and the experts move
to the placement the EPLB policy chose. Nothing else about a staying rank changes: its
model, KV cache, scheduler and running requests carry on.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import msgspec
import torch
import torch.distributed as dist

from epplat.core.distributed.elastic_world import ScaleRolledBack, agree, join_world, rendezvous
from epplat.core.moe import eplb_transfer
from epplat.core.moe.all2all import ExpertMap
from epplat.core.moe.elastic_placement import initial_placement, move_experts, moe_layers, new_placement, placement
from epplat.plugins import registry

logger = logging.getLogger(__name__)


class Rescale(msgspec.Struct, array_like=True, tag=True):
    """A driver's scale call, sent on to its TP workers (they run ``rescale`` with it beside the driver)."""

    new_size: int
    generation: int
    wave: int
    leaving: list = []       # the DP ranks that leave (none: those from new_size up)


def rescale(runner, ps, new_size: int, generation: int, wave: int, leaving=()) -> bool:
    """A running process's part of a scale to ``new_size`` DP ranks (every TP process of a DP rank runs it);
    False when this process leaves. Expert slots are per EP rank: DP ranks x TP processes. Scaling down,
    ``leaving`` names the DP ranks that go (default: the top ones); the ones above them move down."""
    t0, tp = time.perf_counter(), ps.tp_size
    layers = moe_layers(runner.model)
    per_rank = runner.all2all.expert_map.num_local
    _settle_eplb(runner)
    old, old_size = placement(layers), ps.dp_size
    if new_size < old_size:
        leaving = list(leaving) or list(range(new_size, old_size))
        staying = [d for d in range(old_size) if d not in leaving]
        new = new_placement(layers, runner.eplb, _policy(runner), _num_groups(runner), old, new_size * tp, per_rank,
                            ps.world_cpu_group)
        new, moves, staged = move_experts(layers, old, _in_old_slots(new, staying, old_size, tp, per_rank), ps.rank,
                                          per_rank, ps.world_group)
        if ps.dp_rank in leaving:
            logger.info("elastic EP: DP rank %d%s handed its experts over and leaves", ps.dp_rank,
                        f" TP rank {ps.tp_rank}" if tp > 1 else "")
            return False
        ps.rank = staying.index(ps.dp_rank) * tp + ps.tp_rank
        store = rendezvous(runner.cfg.parallel, ps.rank, generation, new_size * tp)
        join_world(runner.cfg.parallel, ps, generation, new_size, runner.platform.dist_backend, store)
        _adopt(runner, ps, per_rank)
        eplb_transfer.commit(staged, layers, torch.cat([_slots_of(new, d, tp, per_rank) for d in staying], 1))
    else:
        store = rendezvous(runner.cfg.parallel, ps.rank, generation, new_size * tp, ps.world_cpu_group)
        join_world(runner.cfg.parallel, ps, generation, new_size, runner.platform.dist_backend, store)
        try:
            moves = _grow(runner, ps, layers, per_rank, old_size, old, wave, store, generation)[1]
        except ScaleRolledBack:
            _roll_back(runner, ps, layers, per_rank, old, generation)
            raise
    if ps.rank == 0:
        logger.info("elastic EP: %d -> %d DP ranks (world generation %d): %d expert moves, %.2f s on this rank",
                    old_size, new_size, generation, len(moves), time.perf_counter() - t0)
    return True


def _slots_of(placement, dp_rank: int, tp: int, per_rank: int) -> torch.Tensor:
    """The columns of DP rank ``dp_rank``'s EP ranks (its TP processes') in a placement [L, slots]."""
    return placement[:, dp_rank * tp * per_rank:(dp_rank + 1) * tp * per_rank]


def _in_old_slots(new, staying: list[int], old_size: int, tp: int, per_rank: int) -> torch.Tensor:
    """The new placement [L, slots of the new world] in the old world's slot numbering: a staying DP rank's
    slots get what its new number holds, a departing one's -1."""
    out = torch.full((new.shape[0], old_size * tp * per_rank), -1, dtype=torch.long)
    for i, d in enumerate(staying):
        _slots_of(out, d, tp, per_rank).copy_(_slots_of(new, i, tp, per_rank))
    return out


def join(runner, ps, generation: int, old_size: int) -> int:
    """A new process's part of a scale-up (its ``ps`` already names its rank and the new size); returns the
    wave number the running ranks are at."""
    store = rendezvous(runner.cfg.parallel, ps.rank, generation, ps.world_size)
    join_world(runner.cfg.parallel, ps, generation, ps.dp_size, runner.platform.dist_backend, store)
    return _grow(runner, ps, moe_layers(runner.model), runner.all2all.expert_map.num_local, old_size, None, 0,
                 store, generation)[0]


def _grow(runner, ps, layers, per_rank: int, old_size: int, old, wave: int, store,
          generation: int) -> tuple[int, list]:
    """In the larger world: rank 0's placement and wave to everyone, the policy's placement, the moves; every
    rank commits them only once all say their part of the exchange went well (ScaleRolledBack if not)."""
    group, old_slots = ps.world_cpu_group, per_rank * old_size * ps.tp_size
    head = torch.tensor([wave])
    dist.broadcast(head, src=0, group=group)
    current = torch.empty(len(layers), old_slots, dtype=torch.long) if old is None else old.clone()
    dist.broadcast(current, src=0, group=group)
    num_experts = layers[0].gate.shape[0]
    current = torch.cat([current, initial_placement(len(layers), old_slots, per_rank * ps.world_size,
                                                    num_experts)], 1)
    # each rank's load is in its own slot numbering, so the load is summed before the layers change
    new = new_placement(layers, runner.eplb, _policy(runner), _num_groups(runner), current, ps.world_size, per_rank,
                        group)
    if old is None:
        fault_point("exchange", generation)
    try:
        new, moves, staged = move_experts(layers, current, new, ps.rank, per_rank, ps.world_group)
        ok = True
    except RuntimeError as e:        # a peer died: gloo's pair to it closed
        logger.error("elastic EP: rank %d: the expert exchange failed: %s", ps.rank, e)
        ok = False
    timeout = runner.cfg.parallel.distributed_timeout_seconds
    if not agree(store, ps.rank, ps.world_size, ok, "exchange", timeout):
        raise ScaleRolledBack(f"a rank failed in the expert exchange of world generation {generation}")
    _adopt(runner, ps, per_rank)
    eplb_transfer.commit(staged, layers, new)
    return int(head), moves


def _roll_back(runner, ps, layers, per_rank: int, old, generation: int) -> None:
    """The ranks that were serving form their old world again (nothing was committed: their experts are as
    they were) and rebuild the expert map and all2all backend on it."""
    old_size = old.shape[1] // per_rank // ps.tp_size
    store = rendezvous(runner.cfg.parallel, ps.rank, f"{generation}-rollback", old_size * ps.tp_size)
    join_world(runner.cfg.parallel, ps, f"{generation}-rollback", old_size, runner.platform.dist_backend, store)
    _adopt(runner, ps, per_rank)
    eplb_transfer.commit([], layers, old)
    logger.warning("elastic EP: rank %d is back in its world of %d DP ranks", ps.rank, old_size)


def fault_point(name: str, generation: int) -> None:
    """EPPLAT_ELASTIC_KILL_AT=NAME:GENERATION[,NAME:GENERATION...] kills this (joining) rank at the named point
    of that scale: how the tests make a new rank die mid-scale at a known place. Points: start (its model and
    KV cache are ready, its ready line not sent), exchange (the experts are about to move)."""
    if f"{name}:{generation}" in os.environ.get("EPPLAT_ELASTIC_KILL_AT", "").split(","):
        logger.warning("elastic EP: EPPLAT_ELASTIC_KILL_AT=%s:%d: rank killed at %s", name, generation, name)
        os.kill(os.getpid(), signal.SIGKILL)


def _adopt(runner, ps, per_rank: int) -> None:
    """The expert map, all2all backend and EPLB state of the new world (the placement follows at commit)."""
    par = runner.cfg.parallel
    num_experts = runner.model_cfg.num_experts
    par.data_parallel_size = ps.dp_size
    par.eplb.num_redundant_experts = per_rank * ps.ep_size - num_experts
    emap = ExpertMap(num_experts, ps.ep_rank, ps.ep_size, par.eplb.num_redundant_experts)
    runner.all2all = type(runner.all2all)(emap, group=ps.ep_group, device=runner.device)
    for layer in moe_layers(runner.model):
        layer.all2all, layer.expert_map = runner.all2all, emap
    if runner.eplb is not None:
        rebalances = runner.eplb.rebalances
        runner.eplb = runner._eplb_state(emap)
        runner.eplb.rebalances = rebalances


def _settle_eplb(runner) -> None:
    """An asynchronous rebalance in flight finishes (on every rank: its transfer is collective) first."""
    eplb = runner.eplb
    if eplb is not None and eplb.pending is not None:
        eplb.pending.join()
        eplb.pending = None
        eplb._commit(pause=0.0, overlapped=time.perf_counter() - eplb._t0)


def _policy(runner):
    if runner.eplb is not None:
        return runner.eplb.policy
    return registry().load("eplb_policy", runner.cfg.parallel.eplb.policy, runner.platform.name)


def _num_groups(runner) -> int:
    return getattr(runner.model_cfg, "num_expert_groups", 1) or 1
