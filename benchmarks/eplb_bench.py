"""EPLB under a skewed (Zipf) routing load: balancedness and MoE step time before and after a
rebalance, and the rebalance's pause, synchronous and with use_async.

Spawns --ep processes (gloo on cpu, NCCL on cuda) that each run a stack of epplat MoE layers
(FusedMoE + the allgather_reducescatter all2all backend + the EPLB run time) on --tokens
tokens per rank per step. Routing is drawn from a Zipf law over experts (expert 0 hottest,
so the contiguous initial placement puts the hot experts together), not from a router, so
the load is the same before and after. Per mode (sync, async) and per phase it reports
the median step time over --steps steps (the initial and the rebalanced placement step in
turns, in identical copies of the layers), the mean expert time of the slowest rank (what imbalance
stretches; steadier than the step time on a shared machine) and the balancedness (mean/max
tokens per EP rank);
the rebalance reports its pause (the step that stalls) and, with use_async, how many steps
ran while the weights moved.

    python benchmarks/eplb_bench.py --ep 2 --experts 32 --redundant 4 --tokens 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def zipf_ids(gen: torch.Generator, tokens: int, experts: int, top_k: int, s: float) -> torch.Tensor:
    p = torch.arange(1, experts + 1, dtype=torch.float64) ** -s
    return torch.multinomial(p.expand(tokens, experts), top_k, replacement=False, generator=gen)


def moe_step(layers, x, gen, args) -> float:
    """One forward through every MoE layer, with Zipf routing in place of the router; returns
    the seconds this rank spent in its experts (the part that load imbalance stretches): on
    cpu the thread's CPU time (one compute thread per rank), so other processes' load on
    the machine does not inflate it."""
    from epplat.core.moe.experts import reference_experts
    expert_s = 0.0
    for layer in layers:
        ids = zipf_ids(gen, x.shape[0], args.experts, args.top_k, args.zipf)
        w = torch.full(ids.shape, 1.0 / args.top_k, dtype=x.dtype, device=x.device)
        ids = ids.to(x.device)
        recv = layer.all2all.dispatch(x, layer.to_physical(ids), w)
        clock = time.perf_counter if x.is_cuda else time.thread_time   # CPU: not inflated by preemption
        t0 = clock()
        y = reference_experts(recv.x, recv.topk_ids, recv.topk_weights, layer.w13, layer.w2, layer.act)
        if x.is_cuda:
            torch.cuda.synchronize()
        expert_s += clock() - t0
        x = layer.all2all.combine(y) + x
    return expert_s


def run_rank(rank: int, args, port: int, out_q) -> None:
    from epplat.config import EPLBConfig
    from epplat.core.ops import ACTIVATIONS
    from epplat.core.moe.all2all import ExpertMap
    from epplat.core.moe.all2all_torch import AllGatherReduceScatter
    from epplat.core.moe.eplb import rebalance_experts
    from epplat.core.moe.eplb_state import EplbState
    from epplat.core.moe.layer import FusedMoE

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dev = torch.device(f"cuda:{rank}" if cuda else "cpu")
    torch.set_num_threads(1 if not cuda else torch.get_num_threads())   # expert CPU time = one thread's
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.ep)
    dtype = getattr(torch, args.dtype)
    results = {}

    def build(use_async: bool):
        """A stack of MoE layers in the initial placement and the EPLB state that balances it."""
        emap = ExpertMap(args.experts, rank, args.ep, args.redundant)
        a2a = AllGatherReduceScatter(emap, group=dist.group.WORLD, device=dev)
        torch.manual_seed(0)
        layers = []
        for _ in range(args.layers):
            with torch.device(dev):   # placement tables live where the router runs
                layer = FusedMoE(args.hidden, args.inter, args.experts, args.top_k, True, ACTIVATIONS["silu"],
                                 a2a, dtype)
            for p in (layer.w13, layer.w2):
                p.data.normal_(0, args.hidden ** -0.5)
            for s, e in enumerate(layer.local_logical_ids()):   # a marker: which expert a slot holds
                layer.w13.data[s, 0, 0] = e
            layers.append(layer)
        cfg = EPLBConfig(window_size=args.steps, step_interval=1 << 30, num_redundant_experts=args.redundant,
                         use_async=use_async)
        return layers, EplbState(cfg, layers, emap, rebalance_experts, group=dist.group.WORLD)

    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(args.tokens, args.hidden, dtype=dtype, device=dev) * 0.1

    def step(layers, state) -> tuple[float, float]:
        """(wall seconds, this rank's expert seconds) of one step; ranks start it together."""
        dist.barrier()
        t0 = time.perf_counter()
        e = moe_step(layers, x, gen, args)
        state.end_step()
        return time.perf_counter() - t0, e

    def slowest(expert_s: list[float]) -> float:
        """Mean per-step expert ms of the slowest rank."""
        t = torch.tensor([statistics.mean(expert_s)], dtype=torch.float64, device=dev)   # NCCL: on the GPU
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return round(float(t) * 1e3, 2)

    for mode in ("sync", "async"):
        # two identical stacks: one stays in the initial placement, one is rebalanced; afterwards
        # their steps alternate, so load from other processes on the machine hits both alike
        initial, initial_state = build(False)
        balanced, state = build(mode == "async")
        for _ in range(args.warmup):
            step(balanced, state)
        state.reset()
        for _ in range(args.steps):
            step(balanced, state)
        dist.barrier()
        t0 = time.perf_counter()
        state.rebalance()
        call_s = time.perf_counter() - t0
        during = []
        while state.pending is not None:
            during.append(step(balanced, state)[0])
        for _ in range(args.warmup):
            step(initial, initial_state)
            step(balanced, state)
        initial_state.reset()
        state.reset()
        before, after = [], []
        for _ in range(args.steps):
            before.append(step(initial, initial_state))
            after.append(step(balanced, state))
        bal_before, _ = initial_state.window_balancedness()
        bal_after, _ = state.window_balancedness()
        for layer in balanced:   # every slot holds the weights of the expert the placement names
            for s, e in enumerate(layer.local_logical_ids()):
                assert int(layer.w13[s, 0, 0]) == e, (s, e)
        results[mode] = {
            "balancedness_before": round(bal_before, 4), "balancedness_after": round(bal_after, 4),
            "step_ms_before": round(statistics.median(t for t, _ in before) * 1e3, 2),
            "step_ms_after": round(statistics.median(t for t, _ in after) * 1e3, 2),
            "slowest_rank_expert_ms_before": slowest([e for _, e in before]),
            "slowest_rank_expert_ms_after": slowest([e for _, e in after]),
            "rebalance_call_ms": round(call_s * 1e3, 2),
            "pause_ms": round(state.last["pause_s"] * 1e3, 2),
            "steps_during_transfer": len(during),
            "step_ms_during_transfer": round(statistics.mean(during) * 1e3, 2) if during else None,
            "expert_moves": state.last["moves"],
        }
        del state, initial_state, balanced, initial
    if rank == 0:
        out_q.put(results)
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--redundant", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per EP rank per step")
    ap.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of expert popularity")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if (args.experts + args.redundant) % args.ep:
        print(f"eplb_bench: error: {args.experts} + {args.redundant} experts do not divide over {args.ep} ranks",
              file=sys.stderr)
        return 2
    from socket import socket
    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=run_rank, args=(r, args, port, q)) for r in range(args.ep)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs) or q.empty():
        print("eplb_bench: error: a rank failed", file=sys.stderr)
        return 1
    res = q.get()
    res["config"] = vars(args) | {"torch": torch.__version__, "cpu_threads_per_rank": 1}
    print(f"EP={args.ep} experts={args.experts}+{args.redundant} redundant, top-{args.top_k}, "
          f"{args.layers} layers, {args.tokens} tokens/rank, Zipf s={args.zipf}, {args.device} {args.dtype}")
    print(f"{'mode':<6} {'balanced before':>15} {'after':>6} {'step ms before':>15} {'after':>7} "
          f"{'slowest-rank expert ms before':>30} {'after':>7} {'pause ms':>9} {'steps overlapped':>17} "
          f"{'moves':>6}")
    for mode in ("sync", "async"):
        r = res[mode]
        print(f"{mode:<6} {r['balancedness_before']:>15.3f} {r['balancedness_after']:>6.3f} "
              f"{r['step_ms_before']:>15.2f} {r['step_ms_after']:>7.2f} {r['slowest_rank_expert_ms_before']:>30.2f} "
              f"{r['slowest_rank_expert_ms_after']:>7.2f} {r['pause_ms']:>9.2f} {r['steps_during_transfer']:>17} "
              f"{r['expert_moves']:>6}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
