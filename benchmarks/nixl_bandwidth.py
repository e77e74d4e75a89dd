"""KV transfer bandwidth through NIXL (UCX, host memory) between two processes, against a plain
memcpy of the same bytes in one process, on the same machine, in one run.

The target process registers a buffer laid out as KV blocks; the initiator READs all of them
(one descriptor per block, as NixlConnector does) into its own registered buffer, and the
transfer completes when check_xfer_state says DONE. Agent metadata goes through a pipe as raw
bytes. memcpy is torch's copy_ of a tensor of the same size (dst.copy_(src)).

    python benchmarks/nixl_bandwidth.py --mib 256 --block-kib 64 256 --iters 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch


def _target(conn, nbytes: int) -> None:
    from nixl._api import nixl_agent, nixl_agent_config
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    agent = nixl_agent("target", nixl_agent_config(backends=["UCX"]))
    agent.register_memory([(src.data_ptr(), nbytes, 0, "")], "DRAM")
    conn.send_bytes(agent.get_agent_metadata())
    conn.send_bytes(str(src.data_ptr()).encode())
    conn.send_bytes(src[:4096].numpy().tobytes())
    conn.recv_bytes()        # until the initiator is done


def _initiator(conn, nbytes: int, block: int, iters: int, out) -> None:
    from nixl._api import nixl_agent, nixl_agent_config
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    agent = nixl_agent("initiator", nixl_agent_config(backends=["UCX"]))
    agent.register_memory([(dst.data_ptr(), nbytes, 0, "")], "DRAM")
    name = agent.add_remote_agent(conn.recv_bytes())
    base = int(conn.recv_bytes())
    head = conn.recv_bytes()
    n = nbytes // block
    local = agent.get_xfer_descs([(dst.data_ptr() + i * block, block, 0) for i in range(n)], "DRAM")
    remote = agent.get_xfer_descs([(base + i * block, block, 0) for i in range(n)], "DRAM")
    times = []
    for _ in range(iters + 1):      # the first one warms up the connection
        dst.zero_()
        t0 = time.perf_counter()
        h = agent.initialize_xfer("READ", local, remote, name)
        agent.transfer(h)
        while (state := agent.check_xfer_state(h)) == "PROC":
            pass
        times.append(time.perf_counter() - t0)
        agent.release_xfer_handle(h)
        assert state == "DONE" and dst[:4096].numpy().tobytes() == head
    out.send_bytes(",".join(f"{t:.6f}" for t in times[1:]).encode())
    conn.send_bytes(b"done")


def nixl_seconds(nbytes: int, block: int, iters: int) -> list[float]:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    res_r, res_w = ctx.Pipe(duplex=False)
    t = ctx.Process(target=_target, args=(a, nbytes))
    i = ctx.Process(target=_initiator, args=(b, nbytes, block, iters, res_w))
    t.start()
    i.start()
    times = [float(x) for x in res_r.recv_bytes().decode().split(",")]
    i.join()
    t.join()
    return times


def memcpy_seconds(nbytes: int, iters: int) -> list[float]:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    times = []
    for _ in range(iters):
        dst.zero_()
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--block-kib", type=int, nargs="+", default=[64, 256])
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    nbytes = args.mib << 20
    gbs = lambda ts: nbytes / statistics.median(ts) / 1e9   # noqa: E731
    mem = memcpy_seconds(nbytes, args.iters)
    print(f"memcpy (torch copy_, 1 thread of {torch.get_num_threads()}): {gbs(mem):.2f} GB/s "
          f"(median of {args.iters}, {args.mib} MiB)")
    for kib in args.block_kib:
        ts = nixl_seconds(nbytes, kib << 10, args.iters)
        print(f"NIXL UCX READ, {kib} KiB blocks: {gbs(ts):.2f} GB/s ({gbs(ts) / gbs(mem):.2f}x memcpy; "
              f"best {nbytes / min(ts) / 1e9:.2f} GB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
