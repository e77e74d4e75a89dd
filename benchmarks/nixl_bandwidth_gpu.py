"""KV transfer bandwidth through NIXL on GPU memory between two processes of one GPU, against a
device-to-device copy_ of the same bytes, in one run.

The one-GPU PD pair (gpu_suite.sh pd-nixl) moves its KV cache this way: the prefill server's
blocks are registered as VRAM with its NIXL agent (UCX backend), the decode server READs them into
its own registered blocks. Which UCX transport carries the READ decides the speed: cuda_ipc maps
the peer's memory and copies on the device; without it UCX emulates the READ through host memory
over tcp. UCX's cuda_ipc offers zero-copy GET only where it finds NVLink unless
UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y (its default "auto"); this script runs each UCX setting it is given
in a fresh pair of processes, so the settings compare side by side:

    python benchmarks/nixl_bandwidth_gpu.py --mib 256 --block-kib 256 \
        --ucx "" "UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y"

Each setting prints GB/s of the NIXL READ (median of --iters after one warm-up, one descriptor per
contiguous run as NixlConnector's merge makes them) and of torch's copy_ on the same device, and,
with UCX_PROTO_INFO=y, UCX's own line naming the protocol it chose.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time


def _apply(env: str) -> None:
    for item in env.split():
        key, _, value = item.partition("=")
        os.environ[key] = value


def _target(conn, nbytes: int, env: str) -> None:
    _apply(env)
    import torch
    from nixl._api import nixl_agent, nixl_agent_config
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    agent = nixl_agent("target", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    agent.register_memory([(src.data_ptr(), nbytes, 0, "")], "VRAM")
    conn.send_bytes(agent.get_agent_metadata())
    conn.send_bytes(str(src.data_ptr()).encode())
    conn.send_bytes(src[:4096].cpu().numpy().tobytes())
    while not conn.poll(0.001):      # progress the agent until the initiator is done
        agent.get_new_notifs()


def _initiator(conn, nbytes: int, block: int, iters: int, env: str, out) -> None:
    _apply(env)
    import torch
    from nixl._api import nixl_agent, nixl_agent_config
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    agent = nixl_agent("initiator", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    agent.register_memory([(dst.data_ptr(), nbytes, 0, "")], "VRAM")
    name = agent.add_remote_agent(conn.recv_bytes())
    base = int(conn.recv_bytes())
    head = conn.recv_bytes()
    # NixlConnector merges runs of blocks adjacent on both sides: all blocks here are adjacent,
    # so every descriptor is one block run of `block` bytes (a KV block of one layer).
    n = nbytes // block
    local = agent.get_xfer_descs([(dst.data_ptr() + b * block, block, 0) for b in range(n)], "VRAM")
    remote = agent.get_xfer_descs([(base + b * block, block, 0) for b in range(n)], "VRAM")
    rows = []
    for _ in range(iters + 1):       # the first warms up the connection and the IPC mapping cache
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        copy_s = time.perf_counter() - t0
        dst.zero_()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        h = agent.initialize_xfer("READ", local, remote, name)
        agent.transfer(h)
        while (state := agent.check_xfer_state(h)) == "PROC":
            pass
        torch.cuda.synchronize()
        nixl_s = time.perf_counter() - t0
        agent.release_xfer_handle(h)
        assert state == "DONE" and dst[:4096].cpu().numpy().tobytes() == head, state
        rows.append((copy_s, nixl_s))
    out.send_bytes(" ".join(f"{c:.6f},{x:.6f}" for c, x in rows[1:]).encode())
    conn.send_bytes(b"done")


def measure(nbytes: int, block: int, iters: int, env: str) -> tuple[float, float]:
    """Median seconds of (copy_, NIXL READ) under the UCX setting `env`."""
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    res_r, res_w = ctx.Pipe(duplex=False)
    procs = [ctx.Process(target=_target, args=(a, nbytes, env)),
             ctx.Process(target=_initiator, args=(b, nbytes, block, iters, env, res_w))]
    for p in procs:
        p.start()
    pairs = [tuple(map(float, r.split(","))) for r in res_r.recv_bytes().decode().split()]
    for p in procs:
        p.join()
    return statistics.median(c for c, _ in pairs), statistics.median(x for _, x in pairs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--block-kib", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--ucx", nargs="+", default=[""],
                   help="UCX settings to compare, each a space-separated list of VAR=value ('' = UCX defaults)")
    args = p.parse_args(argv)
    nbytes = args.mib << 20
    for env in args.ucx:
        copy_s, nixl_s = measure(nbytes, args.block_kib << 10, args.iters, env)
        print(f"{args.mib} MiB in {args.block_kib} KiB blocks, {env or 'UCX defaults'}: NIXL READ "
              f"{nbytes / nixl_s / 1e9:.2f} GB/s, copy_ {nbytes / copy_s / 1e9:.2f} GB/s, "
              f"NIXL/copy_ {copy_s / nixl_s:.3f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
