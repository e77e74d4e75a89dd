"""Elastic EP: re-forming the world of running engine processes at a new size.

A scale makes generation g of the world. Every process that stays destroys its process
groups (its model, KV cache and requests stay as they are) and joins, with the
processes that are new, a world of the new size over that generation's store; the
groups are then made as at startup (parallel_state.make_groups). A scale through the API
server takes ranks off the top, so a staying rank keeps its number; with external load
balancing any rank but 0 may leave and the ones above it move down. Each generation's
store is a file in the run's socket folder on one node, else a prefix of the deployment's
TCPStore (world rank 0 serves it, and never leaves; so with Ray across nodes).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time

import torch
import torch.distributed as dist

from epplat.core.distributed import parallel_state
from epplat.core.distributed.parallel_state import ParallelState, make_groups

logger = logging.getLogger(__name__)


JOIN_TIMEOUT_S = 30.0     # the new ranks are loaded when the scale call comes: joining takes well under this


class JoinAborted(RuntimeError):
    """Not every rank of the new world checked in; the ranks that were serving keep their world."""


def rendezvous(parallel, rank: int, generation: "int | str", world_size: int, old_group=None,
               timeout: float = JOIN_TIMEOUT_S) -> "dist.FileStore":
    """Check in to generation ``generation`` and wait for all ``world_size`` ranks, before anything of the
    current world is given up. The ranks that were serving agree over ``old_group`` (a gloo group of them all) whether everyone came;
    JoinAborted (on all of them) when not."""
    store = generation_store(parallel, generation, world_size)
    store.set(f"epplat/pid/{rank}", f"{socket.gethostname()} {os.getpid()}")   # agree() tells a dead rank by it
    store.add("epplat/joined", 1)
    deadline = time.monotonic() + timeout
    while (n := store.add("epplat/joined", 0)) < world_size and time.monotonic() < deadline:
        time.sleep(0.005)
    came = torch.tensor([int(n >= world_size)])
    if old_group is not None:
        dist.all_reduce(came, op=dist.ReduceOp.MIN, group=old_group)
    if not int(came):
        raise JoinAborted(f"{n} of {world_size} ranks joined world generation {generation} within {timeout:g} s")
    return store


def generation_store(parallel, generation, world_size: int):
    if parallel.local_sockets:
        return dist.FileStore(os.path.join(parallel.ipc_dir, f"store-g{generation}"), world_size)
    return dist.PrefixStore(f"epplat/g{generation}/", parallel_state.base_store(parallel))


class ScaleRolledBack(RuntimeError):
    """A rank of the new world failed (or died) before the experts were committed: the ranks that were
    serving formed their old world again, with their placement; the scale failed."""


def agree(store, rank: int, world_size: int, ok: bool, what: str, timeout: float) -> bool:
    """Every rank of a world says over its generation's store whether ``what`` went well; True when all did,
    False as soon as one says it failed or has died (its process is gone or a zombie: one node)."""
    store.set(f"epplat/{what}/{rank}", "1" if ok else "0")
    pending, deadline = set(range(world_size)), time.monotonic() + timeout
    while pending:
        for r in sorted(pending):
            if store.check([f"epplat/{what}/{r}"]):
                if store.get(f"epplat/{what}/{r}") != b"1":
                    return False
                pending.discard(r)
            elif not _alive(store.get(f"epplat/pid/{r}").decode()) or time.monotonic() > deadline:
                logger.error("elastic EP: rank %d did not finish the %s (%s)", r, what,
                             "timed out" if time.monotonic() > deadline else "its process is gone")
                return False
        time.sleep(0.005)
    return True


def _alive(host_pid: str) -> bool:
    """False when the process is gone or a zombie; a process of another host counts as alive (its
    collectives time out instead)."""
    host, pid = host_pid.split()
    if host != socket.gethostname():
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def join_world(parallel, st: ParallelState, generation, dp_size: int, backend: str, store) -> None:
    """Leave the current world (if any) and join generation ``generation`` of ``dp_size`` DP ranks (each of
    its TP processes) over ``store`` (from rendezvous); ``st`` is updated in place (every component holds it)."""
    t0 = time.perf_counter()
    if dist.is_initialized():
        dist.destroy_process_group()
    timeout = parallel_state.collective_timeout() or datetime.timedelta(
        seconds=parallel.distributed_timeout_seconds)
    parallel_state._timeout = timeout
    st.dp_size, st.world_size = dp_size, dp_size * st.tp_size
    st.dp_rank = st.rank // st.tp_size
    if parallel.node_addresses:        # Ray across nodes: the node Ray placed this process on
        parallel_state.bind_gloo_to(parallel.node_addresses[st.rank])
    else:                              # single node: gloo on the loopback
        parallel_state.bind_gloo_to("127.0.0.1" if parallel.ipc_dir else
                                    parallel_state.node_address(parallel.data_parallel_address),
                                    named=not parallel.ipc_dir)
    dist.init_process_group(backend, store=store, rank=st.rank, world_size=st.world_size, timeout=timeout)
    make_groups(st, timeout)
    logger.info("elastic EP: rank %d joined world generation %s of %d ranks in %.2f s", st.rank, generation,
                st.world_size, time.perf_counter() - t0)
