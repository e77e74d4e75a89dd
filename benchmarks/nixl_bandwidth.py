"""KV transfer bandwidth through NIXL (UCX, host memory) between two processes, against a plain
memcpy of the same bytes in one process, on the same machine, in one run.

The target process registers a buffer laid out as KV blocks; the initiator READs all of them
into its own registered buffer in one transfer, and the transfer completes when
check_xfer_state says DONE. Two descriptor lists: ``per-block`` (one descriptor per block, as
NixlConnector did before 2026-12-02) and ``merged`` (NixlConnector's ``merge``: runs of blocks
adjacent on both sides become one descriptor; the blocks here are all adjacent). Agent metadata
goes through a pipe as raw bytes. With and without the agents' UCX progress thread (nixl's
default is on; an idle agent's thread then spins on a core: 1.26 s of CPU in 3 s idle, measured
2026-12-02).

Every iteration runs, in the initiator process and one right after the other so that all see the
same machine load: torch's copy_ of the same bytes (dst.copy_(src)), libc memcpy of them (one
call, one thread: the "plain memcpy"), process_vm_readv of the target's buffer (one call: the
syscall that UCX's cma transport, the one it picks for host-memory READs between processes of one
machine, makes; so the ceiling of NIXL here), then the NIXL READ, split into its phases: prepare
(initialize_xfer), post (transfer) and wait (check_xfer_state until DONE). Ratios are medians of
the per-iteration ratios. UCX_* variables of the environment reach both agents (e.g. UCX_TLS).

    python benchmarks/nixl_bandwidth.py --mib 64 --block-kib 64 --iters 9
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import statistics
import time

import numpy as np
import torch

PHASES = ("torch_copy", "memcpy", "process_vm_readv", "nixl", "prepare", "post", "wait")


class _iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_iovec), ctypes.c_ulong,
                                   ctypes.POINTER(_iovec), ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_readv.restype = ctypes.c_ssize_t


def _buffer(nbytes: int, huge: bool) -> torch.Tensor:
    """Random bytes; on huge pages as the cpu platform's KV cache (or on small pages, as before 2026-12-02)."""
    from epplat.platforms.cpu import huge_pages
    buf = huge_pages.zeros((nbytes,), torch.uint8) if huge else torch.zeros(nbytes, dtype=torch.uint8)
    return buf.random_(0, 255)


def _target(conn, nbytes: int, prog_thread: bool, huge: bool) -> None:
    from nixl._api import nixl_agent, nixl_agent_config
    src = _buffer(nbytes, huge)
    agent = nixl_agent("target", nixl_agent_config(enable_prog_thread=prog_thread, backends=["UCX"]))
    agent.register_memory([(src.data_ptr(), nbytes, 0, "")], "DRAM")
    conn.send_bytes(agent.get_agent_metadata())
    conn.send_bytes(f"{src.data_ptr()} {os.getpid()}".encode())
    conn.send_bytes(src[:4096].numpy().tobytes())
    while not conn.poll(0.001):      # until the initiator is done; without a progress thread, this
        agent.get_new_notifs()       # progresses the agent (connection set-up needs both sides), as the engine loop does


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _untouched(nbytes: int, huge: bool) -> torch.Tensor:
    """Zero bytes never touched (calloc), as the cpu platform's KV cache is before its first use."""
    from epplat.platforms.cpu import huge_pages
    if huge:
        return huge_pages.zeros((nbytes,), torch.uint8)
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8))


def _initiator(conn, nbytes: int, block: int, iters: int, merged: bool, prog_thread: bool, huge: bool,
               fresh: bool, out) -> None:
    from nixl._api import nixl_agent, nixl_agent_config

    from epplat.connectors.nixl import merge
    src = _buffer(nbytes, huge)
    if fresh:   # each copy of each iteration into its own never-touched slice of one pool per kind
        pools = {k: _untouched((iters + 1) * nbytes, huge) for k in PHASES[:4]}
        dest = lambda kind, i: pools[kind][i * nbytes:(i + 1) * nbytes]   # noqa: E731
    else:       # one destination, every page resident before the first measurement
        dst = _buffer(nbytes, huge)
        pools = {k: dst for k in PHASES[:4]}
        dest = lambda kind, i: dst.zero_()   # noqa: E731
    agent = nixl_agent("initiator", nixl_agent_config(enable_prog_thread=prog_thread, backends=["UCX"]))
    agent.register_memory([(pools["nixl"].data_ptr(), pools["nixl"].numel(), 0, "")], "DRAM")
    name = agent.add_remote_agent(conn.recv_bytes())
    base, pid = map(int, conn.recv_bytes().split())
    head = conn.recv_bytes()
    n = nbytes // block
    remote_list = [(base + b * block, block, 0) for b in range(n)]
    descs = []
    for i in range(iters + 1):
        at = dest("nixl", i).data_ptr()
        local, remote = [(at + b * block, block, 0) for b in range(n)], remote_list
        if merged:
            local, remote = merge(local, remote)
        descs.append((agent.get_xfer_descs(local, "DRAM"), agent.get_xfer_descs(remote, "DRAM")))

    def pvr(to: torch.Tensor):
        liov, riov = _iovec(to.data_ptr(), nbytes), _iovec(base, nbytes)
        got = _libc.process_vm_readv(pid, ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0)
        assert got == nbytes, (got, ctypes.get_errno())

    rows = []
    for i in range(iters + 1):      # the first one warms up the connection
        to = dest("torch_copy", i)
        row = {"torch_copy": _timed(lambda: to.copy_(src))}
        to = dest("memcpy", i)
        row["memcpy"] = _timed(lambda: ctypes.memmove(to.data_ptr(), src.data_ptr(), nbytes))
        to = dest("process_vm_readv", i)
        row["process_vm_readv"] = _timed(lambda: pvr(to))
        assert to[:4096].numpy().tobytes() == head
        to = dest("nixl", i)
        t0 = time.perf_counter()
        h = agent.initialize_xfer("READ", *descs[i], name)
        t1 = time.perf_counter()
        agent.transfer(h)
        t2 = time.perf_counter()
        while (state := agent.check_xfer_state(h)) == "PROC":
            pass
        t3 = time.perf_counter()
        agent.release_xfer_handle(h)
        assert state == "DONE" and to[:4096].numpy().tobytes() == head
        row.update(nixl=t3 - t0, prepare=t1 - t0, post=t2 - t1, wait=t3 - t2)
        rows.append(row)
    out.send_bytes("\n".join(",".join(f"{r[k]:.6f}" for k in PHASES) for r in rows[1:]).encode())
    conn.send_bytes(b"done")


def measure(nbytes: int, block: int, iters: int, merged: bool, prog_thread: bool, huge: bool,
            fresh: bool = False) -> list[dict]:
    """Seconds of each of PHASES, one dict per iteration."""
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    res_r, res_w = ctx.Pipe(duplex=False)
    t = ctx.Process(target=_target, args=(a, nbytes, prog_thread, huge))
    i = ctx.Process(target=_initiator, args=(b, nbytes, block, iters, merged, prog_thread, huge, fresh, res_w))
    t.start()
    i.start()
    rows = [dict(zip(PHASES, map(float, line.split(",")))) for line in res_r.recv_bytes().decode().splitlines()]
    i.join()
    t.join()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--block-kib", type=int, nargs="+", default=[64])
    p.add_argument("--iters", type=int, default=9)
    p.add_argument("--layouts", nargs="+", choices=["per-block", "merged"], default=["per-block", "merged"])
    p.add_argument("--progress-thread", nargs="+", choices=["on", "off"], default=["off"],
                   help="the agents' UCX progress thread (nixl's default on; NixlConnector's off)")
    p.add_argument("--huge-pages", nargs="+", choices=["on", "off"], default=["off", "on"],
                   help="every buffer on transparent huge pages (the cpu platform's KV cache since 2026-12-02) or not")
    p.add_argument("--fresh-destination", action="store_true",
                   help="copy into never-touched memory each time (a decode side's first use of its KV cache pages)")
    args = p.parse_args(argv)
    nbytes = args.mib << 20
    ucx = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("UCX_")) or "UCX defaults"
    into = "never-touched destinations" if args.fresh_destination else "resident destinations"
    print(f"{args.mib} MiB into {into}, median of {args.iters}, {ucx}, load average {os.getloadavg()[0]:.1f}")
    for kib in args.block_kib:
        for layout, prog, huge in [(lay, p, h) for lay in args.layouts for p in args.progress_thread
                                   for h in args.huge_pages]:
            rows = measure(nbytes, kib << 10, args.iters, layout == "merged", prog == "on", huge == "on",
                           args.fresh_destination)
            med = {k: statistics.median(r[k] for r in rows) for k in PHASES}
            ratio = lambda a, b: statistics.median(r[b] / r[a] for r in rows)   # noqa: E731
            gbs = " ".join(f"{k} {nbytes / med[k] / 1e9:.2f}" for k in PHASES[:4])
            print(f"{kib} KiB blocks, {layout}, progress thread {prog}, huge pages {huge}: GB/s {gbs}; NIXL phases ms prepare "
                  f"{med['prepare'] * 1e3:.2f} post {med['post'] * 1e3:.2f} wait {med['wait'] * 1e3:.2f}; "
                  f"NIXL/memcpy {ratio('nixl', 'memcpy'):.2f}x, NIXL/torch copy_ {ratio('nixl', 'torch_copy'):.2f}x, "
                  f"NIXL/process_vm_readv {ratio('nixl', 'process_vm_readv'):.2f}x, "
                  f"process_vm_readv/memcpy {ratio('process_vm_readv', 'memcpy'):.2f}x")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
