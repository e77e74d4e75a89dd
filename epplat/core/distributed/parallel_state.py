"""Process groups: world, tensor-parallel (per DP rank and stage), data-parallel (drivers) and expert-parallel.

World rank = (dp_rank * pp_size + pp_rank) * tp_size + tp_rank (vLLM's order). Each DP rank is an
engine core of pp_size x tp_size processes; its first stage's tp_rank 0 process (the driver) runs
the scheduler. The EP group is every rank of one pipeline stage over all DP ranks (the whole world
without PP) when expert parallelism is on; otherwise experts are sharded over the TP group. A single
process needs no torch.distributed at all.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from epplat.config import ConfigError
from epplat.core.distributed.store_auth import check_peers

logger = logging.getLogger(__name__)


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    ep: bool = False
    tp_group: Optional[object] = None
    tp_cpu_group: Optional[object] = None  # gloo twin of tp_group for small CPU tensors (control)
    dp_group: Optional[object] = None      # gloo group of the drivers (tp_rank 0) of every DP rank
    world_group: Optional[object] = None
    world_cpu_group: Optional[object] = None   # gloo twin of world_group (elastic EP's control tensors)
    engine_cpu_group: Optional[object] = None   # gloo group of this DP rank's processes (every stage and TP rank)
    stage_group: Optional[object] = None     # this stage's ranks over every DP rank (the EP group with PP)

    @property
    def is_driver(self) -> bool:
        return self.tp_rank == 0 and self.pp_rank == 0

    @property
    def ep_rank(self) -> int:
        return self.dp_rank * self.tp_size + self.tp_rank if self.ep else 0

    @property
    def ep_size(self) -> int:
        return self.dp_size * self.tp_size if self.ep else 1

    @property
    def ep_group(self):
        if not self.ep:
            return None
        return self.world_group if self.pp_size == 1 else self.stage_group

    def ep_groups_ranks(self) -> list[list[int]]:
        """The world ranks of every EP group (one per pipeline stage), in stage order."""
        tp, pp = self.tp_size, self.pp_size
        return [[(d * pp + s) * tp + t for d in range(self.dp_size) for t in range(tp)] for s in range(pp)]


_timeout: Optional[datetime.timedelta] = None
_base_store = None      # the TCPStore at data_parallel_address:data_parallel_rpc_port (world rank 0 serves it)


def collective_timeout() -> Optional[datetime.timedelta]:
    """--distributed-timeout-seconds, for groups made after init_parallel (torch's default for a new
    group is 30 minutes, whatever the world's timeout)."""
    return _timeout


def init_parallel(parallel, rank: int, backend: str) -> ParallelState:
    """Join the world (store at data_parallel_address:data_parallel_rpc_port) and make the groups.
    With --enable-elastic-ep a world of one process is a torch.distributed world too (ranks join it later)."""
    tp, pp, dp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size, parallel.data_parallel_size
    st = ParallelState(rank=rank, world_size=tp * pp * dp, tp_rank=rank % tp, tp_size=tp, pp_rank=rank % (tp * pp) // tp,
                       pp_size=pp, dp_rank=rank // (tp * pp), dp_size=dp, ep=parallel.enable_expert_parallel)
    if st.world_size == 1 and not parallel.enable_elastic_ep:
        return st
    global _timeout
    timeout = _timeout = datetime.timedelta(seconds=parallel.distributed_timeout_seconds)
    init = parallel.dist_init_method()
    if parallel.node_addresses:        # Ray across nodes: the node Ray placed this rank on
        bind_gloo_to(parallel.node_addresses[rank])
    else:
        bind_gloo_to("127.0.0.1" if init else node_address(parallel.data_parallel_address), named=not init)
    store = None if init else _tcp_store(parallel, rank, st.world_size, timeout)
    if store is not None and parallel.internal_secret:
        check_peers(store, parallel.internal_secret, rank, st.world_size)
    dist.init_process_group(backend, init_method=init, store=store, rank=rank, world_size=st.world_size,
                            timeout=timeout)
    make_groups(st, timeout)
    return st


def make_groups(st: ParallelState, timeout) -> None:
    """The TP, TP-gloo, drivers (and with PP: per-DP-rank and per-stage) groups of a world just joined
    (every rank calls it, in the same order)."""
    tp, pp, dp = st.tp_size, st.pp_size, st.dp_size
    st.world_group = dist.group.WORLD
    for d in range(dp):
        for s in range(pp):
            first = (d * pp + s) * tp
            ranks = list(range(first, first + tp))
            g, cpu = dist.new_group(ranks, timeout=timeout), dist.new_group(ranks, backend="gloo", timeout=timeout)
            if (d, s) == (st.dp_rank, st.pp_rank):
                st.tp_group, st.tp_cpu_group = g, cpu
    drivers = dist.new_group([d * pp * tp for d in range(dp)], backend="gloo", timeout=timeout)
    st.dp_group = drivers if st.is_driver else None
    st.world_cpu_group = (dist.new_group(list(range(st.world_size)), backend="gloo", timeout=timeout)
                          if tp * pp > 1 else drivers)
    if pp > 1:
        for d in range(dp):
            g = dist.new_group(list(range(d * pp * tp, (d + 1) * pp * tp)), backend="gloo", timeout=timeout)
            if d == st.dp_rank:
                st.engine_cpu_group = g
        for s, ranks in enumerate(st.ep_groups_ranks()):
            g = dist.new_group(ranks, timeout=timeout)
            if s == st.pp_rank:
                st.stage_group = g
    if tp == 1:
        st.tp_group = st.tp_cpu_group = None
    if pp == 1:
        st.engine_cpu_group = st.tp_cpu_group
    logger.info("rank %d/%d: DP rank %d, PP rank %d, TP rank %d, EP %s", st.rank, st.world_size, st.dp_rank,
                st.pp_rank, st.tp_rank, f"rank {st.ep_rank}/{st.ep_size}" if st.ep else "off")


def node_address(head: str) -> str:
    """This node's address for internal traffic: EPPLAT_HOST_IP, else VLLM_HOST_IP (vLLM's meaning: the
    node's IP when it has several interfaces), else the address the route towards `head` leaves from."""
    return os.environ.get("EPPLAT_HOST_IP") or os.environ.get("VLLM_HOST_IP") or _source_address(head)


def _source_address(head: str) -> str:
    """This host's address towards `head` (the address itself on the head's host)."""
    family = socket.AF_INET6 if ":" in head else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((head, 9))            # no packet is sent: only the route is looked up
        return s.getsockname()[0]


def bind_gloo_to(address: str, named: bool = False) -> None:
    """Gloo's listeners go on the interface holding `address` (the loopback on a single node), not on
    whatever the host name resolves to; GLOO_SOCKET_IFNAME, when set, is the operator's choice.
    ``named``: `address` may be the one EPPLAT_HOST_IP / VLLM_HOST_IP names, which an interface must hold."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    name = _interface_of(address)
    var = next((v for v in ("EPPLAT_HOST_IP", "VLLM_HOST_IP") if os.environ.get(v)), None) if named else None
    if var:
        if name is None:
            raise ConfigError(f"{var}={address} is not an address of this host's network interfaces")
        logger.info("internal traffic (gloo) on %s (%s, from %s)", address, name, var)
    if name is None:
        logger.warning("no network interface holds %s; gloo listens where the host name resolves", address)
        return
    os.environ["GLOO_SOCKET_IFNAME"] = name


def _interface_of(address: str) -> Optional[str]:
    """The interface whose (first) IPv4 address is `address` (the loopback's for any of 127.0.0.0/8, which it
    holds whole); None for another one (or IPv6)."""
    siocgifaddr = 0x8915
    if address.startswith("127."):
        address = "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == address:
                return name
    return None


def _tcp_store(parallel, rank: int, world_size: int, timeout) -> "dist.TCPStore":
    """World rank 0 serves the store on its address only (data_parallel_address; its node's with Ray
    across nodes; torch's own listener binds every interface); the others connect to it."""
    global _base_store
    host, port = parallel.rank_address(0), parallel.data_parallel_rpc_port
    if rank:
        _base_store = dist.TCPStore(host, port, world_size, False, timeout)
        return _base_store
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as e:
        listener.close()
        raise ConfigError(f"cannot listen on {host}:{port} (--data-parallel-address / --data-parallel-rpc-port): "
                          f"{e.strerror}") from None
    listener.listen(1024)
    # the store serves on this socket from now on (it keeps the descriptor for the process's life), and
    # outlives the process groups (elastic EP's later worlds use it under a prefix)
    _base_store = dist.TCPStore(host, port, world_size, True, timeout, wait_for_workers=False,
                                master_listen_fd=listener.detach())
    return _base_store


def base_store(parallel, timeout: float = 60.0) -> "dist.TCPStore":
    """The deployment's TCPStore (the one this process's world was made over, else a new client of it)."""
    global _base_store
    if _base_store is None:
        _base_store = dist.TCPStore(parallel.rank_address(0), parallel.data_parallel_rpc_port, None, False,
                                    datetime.timedelta(seconds=timeout))
    return _base_store
