"""The expert-parallel load balancer at run time: load window, rebalance steps, balancedness.

Every MoE layer adds the tokens it routes to each slot into ``pass_load`` (device ops
only, no host sync). After each engine step the pass goes into a ring of
``window_size`` steps. Every ``step_interval`` steps the window, summed over the EP
group, goes to the policy (on EP rank 0), whose placement is broadcast and reached by
moving only the changed experts (epplat.core.moe.eplb_transfer).

Every forward is collective over the EP group (DP ranks without work run dummy steps,
TP workers replay the driver's steps), so every rank counts the same steps and all of
them rebalance at the same one. With ``use_async`` the policy and the transfer run on a
background thread over their own process group while steps go on; at each later step
the ranks agree (one all-reduce of a flag) whether every transfer is done, and commit
the new placement together at the first step where it is.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from epplat.core.distributed.parallel_state import collective_timeout
from epplat.core.moe import eplb_transfer
from epplat.core.moe.layer import replica_tables

logger = logging.getLogger(__name__)


def balancedness(load: torch.Tensor, ep_size: int) -> float:
    """Mean tokens per EP rank / max tokens per EP rank, each summed over layers (load: [L, slots])."""
    per_rank = load.view(load.shape[0], ep_size, -1).sum(-1).double()
    peak = per_rank.max(-1).values.sum()
    return float(per_rank.mean(-1).sum() / peak) if peak > 0 else 1.0


def expert_bytes(layer) -> int:
    """Bytes of one expert's weights in a MoE layer."""
    return (layer.w13[0].numel() + layer.w2[0].numel()) * layer.w13.element_size()


def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def run_policy(policy, logical: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, ep_size: int,
               old: torch.Tensor) -> torch.Tensor:
    """The policy's phy2log [L, num_physical] for the logical load [L, E], checked (ValueError when it is
    not a placement that gives every expert a slot). ``old`` [L, any] is the current placement."""
    num_experts = logical.shape[1]
    extra = {"old_phy2log": old.clone()} if _takes(policy, "old_phy2log") else {}
    new = policy(logical, num_physical, num_groups, num_nodes, ep_size, **extra)[0]
    new = torch.as_tensor(new, dtype=torch.long).cpu()
    shape = (old.shape[0], num_physical)
    if tuple(new.shape) != shape:
        raise ValueError(f"phy2log has shape {tuple(new.shape)}, expected {shape}")
    if new.min() < 0 or new.max() >= num_experts:
        raise ValueError("phy2log names an expert that does not exist")
    for row in new:
        replica_tables(row, num_experts)    # raises when an expert has no slot
    return new


class EplbState:
    def __init__(self, cfg, layers: list, expert_map, policy, group=None, num_groups: int = 1, num_nodes: int = 1,
                 peer_ranks: Optional[list] = None):
        """cfg: EPLBConfig; layers: the MoE layers; group: the EP process group (None: one process);
        peer_ranks: the ranks of every EP group of the world, this one's among them (one per pipeline stage:
        every rank makes every group, in the same order)."""
        expert_map.require_even("EPLB")
        self.cfg, self.layers, self.map, self.policy = cfg, layers, expert_map, policy
        self.num_groups, self.num_nodes = num_groups, num_nodes
        dev = layers[0].w13.device
        slots = expert_map.num_physical
        self.pass_load = torch.zeros(len(layers), slots, dtype=torch.int64, device=dev)
        for i, layer in enumerate(layers):
            layer.load = self.pass_load[i]
        self.window = torch.zeros(cfg.window_size, len(layers), slots, dtype=torch.int32, device=dev)
        self.steps = 0
        self.rebalances = 0
        self.measured = -1.0                  # last balancedness measured (over the EP group), -1: none yet
        self.last: Optional[dict] = None      # figures of the last rebalance
        self.pending: Optional[threading.Thread] = None
        self._result = None
        self.group = group
        self.xfer_group = self.ctrl_group = None
        if group is not None:   # own groups: the transfer thread must not interleave with step collectives
            ranks = dist.get_process_group_ranks(group)
            timeout = collective_timeout()
            for peers in peer_ranks or [ranks]:
                xfer, ctrl = dist.new_group(peers, timeout=timeout), dist.new_group(peers, backend="gloo",
                                                                                       timeout=timeout)
                if peers == ranks:
                    self.xfer_group, self.ctrl_group = xfer, ctrl
        if expert_map.num_redundant and expert_map.ep_rank == 0:
            per = expert_bytes(layers[0])
            logger.info("EPLB: %d redundant experts take %.2f MiB per EP rank (%d MoE layers x %d bytes per "
                        "expert x %d redundant / %d EP ranks)", expert_map.num_redundant,
                        len(layers) * per * expert_map.num_redundant / expert_map.ep_size / (1 << 20), len(layers),
                        per, expert_map.num_redundant, expert_map.ep_size)

    # -- every step -----------------------------------------------------------------------------
    def end_step(self) -> None:
        """After each engine step's forward, on every rank of the EP group."""
        self.window[self.steps % self.cfg.window_size].copy_(self.pass_load)
        self.pass_load.zero_()
        self.steps += 1
        if self.pending is not None:
            self._poll()
        if self.cfg.log_balancedness and self.steps % self.cfg.window_size == 0:
            self._log_balancedness()
        if self.steps % self.cfg.step_interval == 0 and self.pending is None:
            self.rebalance()

    def reset(self) -> None:
        self.window.zero_()
        self.pass_load.zero_()

    def _window_load(self, group, window: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[L, slots] tokens per slot over the window, summed over the EP group, on the CPU."""
        load = (self.window if window is None else window).sum(0, dtype=torch.int64)
        if group is not None:
            if dist.get_backend(group) == "gloo":
                load = load.cpu()
            dist.all_reduce(load, group=group)
        return load.cpu()

    def window_balancedness(self) -> tuple[float, int]:
        """(balancedness, tokens routed) over the window, for the whole EP group (a collective)."""
        load = self._window_load(self.ctrl_group)
        return balancedness(load, self.map.ep_size), int(load.sum())

    def _log_balancedness(self) -> None:
        value, tokens = self.window_balancedness()
        self.measured = value
        if self.map.ep_rank == 0:
            logger.info("EPLB balancedness %.4f over the last %d steps (mean/max tokens per EP rank, %d tokens "
                        "routed)", value, self.cfg.window_size, tokens)

    # -- rebalancing ----------------------------------------------------------------------------
    def rebalance(self) -> None:
        """Start a rebalance now (every EP rank calls it at the same step); without use_async it
        also finishes here, else a later ``end_step`` commits it."""
        old = torch.stack([layer.phy2log for layer in self.layers])
        window = self.window.clone()
        if not self.cfg.use_async:
            t0 = time.perf_counter()
            self._result = self._compute_and_move(window, old)
            self._commit(pause=time.perf_counter() - t0)     # the whole rebalance stalls this step
            return
        self.pending = threading.Thread(target=self._run_async, args=(window, old), name="eplb-transfer",
                                        daemon=True)
        self._t0 = time.perf_counter()
        self.pending.start()

    def _run_async(self, window, old) -> None:
        try:
            self._result = self._compute_and_move(window, old)
        except Exception as e:   # surfaces in the step that commits
            self._result = e

    def _poll(self) -> None:
        done = torch.tensor([int(not self.pending.is_alive())])
        if self.ctrl_group is not None:
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self.ctrl_group)
        if not int(done):
            return
        self.pending.join()
        self.pending = None
        self._commit(pause=0.0, overlapped=time.perf_counter() - self._t0)

    def _compute_and_move(self, window: torch.Tensor, old: torch.Tensor):
        """All-reduce the load, run the policy on EP rank 0, broadcast its placement, move weights."""
        t0 = time.perf_counter()
        load = self._window_load(self.xfer_group, window)
        before = balancedness(load, self.map.ep_size)
        logical = torch.zeros(old.shape[0], self.map.num_experts, dtype=torch.float64)
        logical.scatter_add_(1, old, load.double())
        new = old
        if self.map.ep_rank == 0 and load.sum() > 0:
            new = self._run_policy(logical, old)
        if self.xfer_group is not None:
            dev = "cpu" if dist.get_backend(self.xfer_group) == "gloo" else self.layers[0].w13.device
            buf = new.clone().to(dev)     # never broadcast into `old`
            dist.broadcast(buf, src=dist.get_global_rank(self.xfer_group, 0), group=self.xfer_group)
            new = buf.cpu()
        new = eplb_transfer.keep_in_place(old, new, self.map.num_local)
        moves = eplb_transfer.plan_moves(old, new, self.map.num_local)
        rank = self.map.ep_rank if self.xfer_group is not None else 0
        staged = eplb_transfer.exchange(moves, self.layers, rank, self.map.num_local, self.xfer_group)
        return new, moves, staged, before, time.perf_counter() - t0

    def _run_policy(self, logical: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """The policy's phy2log, checked; the old placement (no move) when it fails or is invalid."""
        try:
            return run_policy(self.policy, logical, self.map.num_physical, self.num_groups, self.num_nodes,
                              self.map.ep_size, old)
        except Exception as e:
            logger.error("EPLB policy %r failed, placement kept: %s", self.cfg.policy, e)
            return old

    def _commit(self, pause: float, overlapped: Optional[float] = None) -> None:
        result, self._result = self._result, None
        if isinstance(result, Exception):
            raise result
        new, moves, staged, before, took = result
        t0 = time.perf_counter()
        eplb_transfer.commit(staged, self.layers, new)
        self.reset()
        self.rebalances += 1
        self.measured = before
        pause += time.perf_counter() - t0
        self.last = {"moves": len(moves), "balancedness_before": before, "transfer_s": took, "pause_s": pause,
                     "overlapped_s": overlapped}
        if self.map.ep_rank == 0:
            per = expert_bytes(self.layers[0])
            how = (f"transfer overlapped {overlapped * 1000:.1f} ms of steps, commit paused {pause * 1000:.1f} ms"
                   if overlapped is not None else f"paused {pause * 1000:.1f} ms")
            logger.info("EPLB rebalance %d at step %d: balancedness %.4f before; %d expert moves (%.2f MiB); "
                        "policy+transfer %.1f ms, %s", self.rebalances, self.steps, before, len(moves),
                        len(moves) * per / (1 << 20), took * 1000, how)
        dump = os.environ.get("EPPLAT_EPLB_DUMP_DIR")
        if dump:
            self._dump(dump)

    def _dump(self, path: str) -> None:
        """Each rank's placement and expert weights after a rebalance (for tests and debugging)."""
        from safetensors.torch import save_file
        tensors = {}
        for i, layer in enumerate(self.layers):
            tensors[f"{i}.phy2log"] = layer.phy2log.clone()
            tensors[f"{i}.w13"] = layer.w13.detach().cpu().contiguous()
            tensors[f"{i}.w2"] = layer.w2.detach().cpu().contiguous()
        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, f"rank{self.map.ep_rank}-rebalance{self.rebalances}.safetensors"))
