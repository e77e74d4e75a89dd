"""KV transfer bandwidth through NIXL (UCX, host memory) between two processes, against a plain
memcpy of the same bytes in one process, on the same machine, in one run.

The target process registers a buffer laid out as KV blocks; the initiator READs all of them
into its own registered buffer in one transfer, and the transfer completes when
check_xfer_state says DONE. Two descriptor lists: ``per-block`` (one descriptor per block, as
NixlConnector did before 2026-12-02) and ``merged`` (NixlConnector's ``merge``: runs of blocks
adjacent on both sides become one descriptor; the blocks here are all adjacent). Agent metadata
goes through a pipe as raw bytes. memcpy is torch's copy_ of a tensor of the same size
(dst.copy_(src)). With and without the agents' UCX progress thread (nixl's default is on;
an idle agent's thread then spins on a core: 1.26 s of CPU in 3 s idle, measured 2026-12-02).
Each NIXL run is measured right after a memcpy run, alternating, so that both
see the same machine load; the ratio is per pair.

    python benchmarks/nixl_bandwidth.py --mib 256 --block-kib 64 256 --iters 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch


def _target(conn, nbytes: int, prog_thread: bool) -> None:
    from nixl._api import nixl_agent, nixl_agent_config
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    agent = nixl_agent("target", nixl_agent_config(enable_prog_thread=prog_thread, backends=["UCX"]))
    agent.register_memory([(src.data_ptr(), nbytes, 0, "")], "DRAM")
    conn.send_bytes(agent.get_agent_metadata())
    conn.send_bytes(str(src.data_ptr()).encode())
    conn.send_bytes(src[:4096].numpy().tobytes())
    while not conn.poll(0.001):      # until the initiator is done; without a progress thread, this
        agent.get_new_notifs()       # progresses the agent (connection set-up needs both sides), as the engine loop does


def _initiator(conn, nbytes: int, block: int, iters: int, merged: bool, prog_thread: bool, out) -> None:
    from nixl._api import nixl_agent, nixl_agent_config

    from epplat.connectors.nixl import merge
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    agent = nixl_agent("initiator", nixl_agent_config(enable_prog_thread=prog_thread, backends=["UCX"]))
    agent.register_memory([(dst.data_ptr(), nbytes, 0, "")], "DRAM")
    name = agent.add_remote_agent(conn.recv_bytes())
    base = int(conn.recv_bytes())
    head = conn.recv_bytes()
    n = nbytes // block
    local = [(dst.data_ptr() + i * block, block, 0) for i in range(n)]
    remote = [(base + i * block, block, 0) for i in range(n)]
    if merged:
        local, remote = merge(local, remote)
    local, remote = agent.get_xfer_descs(local, "DRAM"), agent.get_xfer_descs(remote, "DRAM")
    times, mem = [], []
    for _ in range(iters + 1):      # the first one warms up the connection
        mem.append(memcpy_once(nbytes))
        dst.zero_()
        t0 = time.perf_counter()
        h = agent.initialize_xfer("READ", local, remote, name)
        agent.transfer(h)
        while (state := agent.check_xfer_state(h)) == "PROC":
            pass
        times.append(time.perf_counter() - t0)
        agent.release_xfer_handle(h)
        assert state == "DONE" and dst[:4096].numpy().tobytes() == head
    out.send_bytes(",".join(f"{t:.6f}:{m:.6f}" for t, m in zip(times[1:], mem[1:])).encode())
    conn.send_bytes(b"done")


def nixl_seconds(nbytes: int, block: int, iters: int, merged: bool, prog_thread: bool) -> list[tuple[float, float]]:
    """(NIXL read seconds, memcpy seconds just before it) per iteration."""
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    res_r, res_w = ctx.Pipe(duplex=False)
    t = ctx.Process(target=_target, args=(a, nbytes, prog_thread))
    i = ctx.Process(target=_initiator, args=(b, nbytes, block, iters, merged, prog_thread, res_w))
    t.start()
    i.start()
    times = [tuple(map(float, x.split(":"))) for x in res_r.recv_bytes().decode().split(",")]
    i.join()
    t.join()
    return times


_bufs: dict = {}


def memcpy_once(nbytes: int) -> float:
    if nbytes not in _bufs:
        _bufs[nbytes] = (torch.randint(0, 255, (nbytes,), dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8))
        _bufs[nbytes][1].copy_(_bufs[nbytes][0])
    src, dst = _bufs[nbytes]
    dst.zero_()
    t0 = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--block-kib", type=int, nargs="+", default=[64, 256])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--layouts", nargs="+", choices=["per-block", "merged"], default=["per-block", "merged"])
    p.add_argument("--progress-thread", nargs="+", choices=["on", "off"], default=["on", "off"],
                   help="the agents' UCX progress thread (nixl's default on; NixlConnector's off)")
    args = p.parse_args(argv)
    nbytes = args.mib << 20
    gbs = lambda ts: nbytes / statistics.median(ts) / 1e9   # noqa: E731
    print(f"{args.mib} MiB, median of {args.iters}; memcpy is torch copy_ (1 thread of {torch.get_num_threads()}), "
          f"run just before each NIXL read")
    for kib in args.block_kib:
        for layout, prog in [(lay, p) for lay in args.layouts for p in args.progress_thread]:
            pairs = nixl_seconds(nbytes, kib << 10, args.iters, layout == "merged", prog == "on")
            nixl, mem = [p[0] for p in pairs], [p[1] for p in pairs]
            ratio = statistics.median(m / t for t, m in pairs)
            print(f"NIXL UCX READ, {kib} KiB blocks, {layout} descriptors, progress thread {prog}: "
                  f"{gbs(nixl):.2f} GB/s, memcpy "
                  f"{gbs(mem):.2f} GB/s, ratio {ratio:.2f}x (median of the pairs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
