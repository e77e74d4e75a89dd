"""all2all dispatch + combine time per backend against bare all_to_all_single of the same bytes.

Spawns WORLD processes (gloo on CPU, NCCL on CUDA). For each token count T, every rank
routes T tokens of width HIDDEN to TOPK of EXPERTS experts (uniform random) and times
`combine(dispatch(x))` of each registered all2all backend usable on the platform; a backend
that is not usable here, or that raises, is printed as such (never left out). The
baseline moves the bytes the exchange must move at least — each (token, expert) row
there and back — with two `all_to_all_single` calls.

    python benchmarks/all2all_bench.py --world 2 --tokens 16 128 512 --hidden 2048
    python benchmarks/all2all_bench.py --device cuda --world 2 --tokens 128 4096 --hidden 2048 7168
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _time(fn, iters, device):
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def _worker(rank, args, port, out_q):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=args.world)
    from epplat.core.moe.all2all import ExpertMap
    from epplat.plugins import registry
    reg = registry()
    platform = "cuda" if device == "cuda" else "cpu"
    unusable = {n: why for n in reg.names("all2all") if (why := _unusable(reg, n, platform))}
    names = [n for n in reg.names("all2all") if n not in unusable]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for hidden in args.hidden:
        for t in args.tokens:
            g = torch.Generator().manual_seed(rank)
            x = torch.randn(t, hidden, generator=g).to(device, dtype)
            ids = torch.stack([torch.randperm(args.experts, generator=g)[: args.topk] for _ in range(t)]).to(device)
            w = torch.rand(t, args.topk, generator=g).to(device, dtype)
            row = {"tokens": t, "hidden": hidden}
            send = torch.empty(t * args.topk, hidden, dtype=dtype, device=device)
            recv = torch.empty_like(send)
            row["all_to_all_single"] = _time(lambda: (dist.all_to_all_single(recv, send),
                                                      dist.all_to_all_single(send, recv)), args.iters, device)
            for name in names:
                try:
                    backend = reg.load("all2all", name, platform)(ExpertMap(args.experts, rank, args.world),
                                                                   group=dist.group.WORLD, device=device)
                    row[name] = _time(lambda: backend.combine(backend.dispatch(x, ids, w).x), args.iters, device)
                except Exception as e:   # reported as a failed cell, with its reason below the table
                    row[name] = f"{type(e).__name__}: {e}".splitlines()[0]
            rows.append(row)
    if rank == 0:
        out_q.put({"rows": rows, "unusable": unusable})
    dist.barrier()
    dist.destroy_process_group()


def _unusable(reg, name, platform):
    """None when backend `name` can run on `platform`, else why not (one line)."""
    from epplat.plugins import PluginError
    try:
        reg.get("all2all", name, platform)
        return None
    except PluginError as e:
        return str(e)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 128, 512])
    p.add_argument("--hidden", type=int, nargs="+", default=[2048])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--port", type=int, default=29581)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_worker, args=(args, args.port, q), nprocs=args.world, start_method="spawn", join=True)
    result = q.get()
    rows = result["rows"]
    names = [k for k in rows[0] if k not in ("tokens", "hidden")]
    print(f"{args.device}, {args.world} ranks, top-{args.topk} of {args.experts} experts; time of dispatch+combine "
          f"(ratio to all_to_all_single of the same rows)")
    print(f"{'tokens':>7}{'hidden':>8}" + "".join(f"{n:>30}" for n in names))
    for r in rows:
        base = r["all_to_all_single"]
        cells = "".join(f"{'FAILED':>30}" if isinstance(r[n], str) else f"{r[n] * 1e6:>19.0f} us ({r[n] / base:4.2f}x)"
                        for n in names)
        print(f"{r['tokens']:>7}{r['hidden']:>8}{cells}")
    failed = {n: r[n] for r in rows for n in names if isinstance(r[n], str)}
    for n, why in failed.items():
        print(f"FAILED {n}: {why}")
    for n, why in result["unusable"].items():
        print(f"not measured {n}: {why}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), **result}, f, indent=2)


if __name__ == "__main__":
    main()
