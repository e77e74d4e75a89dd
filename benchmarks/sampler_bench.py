"""The sampler's time per step against greedy, and against a full-vocabulary sort, side by side.

For each batch size, times ``sample()`` with the platform's Kernels record (which ends in a host
copy of the tokens, so device work is included) over a [batch, vocab] float32 logits tensor for
greedy, temperature 1.0 (the record's one-pass ``sample`` kernel), top-k 50, top-p 0.9 and top-k
50 + top-p 0.9 rows; in the same run, temperature 1.0 through the torch path (``sample()`` without
the kernel), on cuda the device time of the kernel alone and of greedy's argmax (back-to-back
launches, CUDA events; and 20 launches captured in one CUDA graph, which leaves the host out), the host
time of one kernel launch through the CompiledKernel's own launcher (what ``Kernels.sample`` does after
its first launch) and through Triton's JITFunction (what it did before), and the temperature-1.0 and top-p
draws through the sort-every-row sampler epplat had before (``full_sort``, below). ``--sweep`` adds the
kernel's device time at other warps / programs per multiprocessor (batch 64 and up). Logits are normal with std --logit-std (4 puts top-p 0.9 at ~500
tokens of 151,936). Threads are set as the platform sets them for a decode step of that batch (cpu:
the C kernels on every thread, torch's ops on one below 128 tokens).

    python benchmarks/sampler_bench.py --device cpu --batch 1 4 16 64 256
    python benchmarks/sampler_bench.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from epplat.core.engine.protocol import EngineRequest, SamplingParams
from epplat.core.engine.request import Request
from epplat.core.engine.sampler import sample
from epplat.plugins import registry

CASES = {"greedy": dict(temperature=0.0), "temperature 1.0": dict(temperature=1.0),
         "top-k 50": dict(temperature=1.0, top_k=50), "top-p 0.9": dict(temperature=1.0, top_p=0.9),
         "top-k 50 + top-p 0.9": dict(temperature=1.0, top_k=50, top_p=0.9)}


def full_sort(logits, reqs):
    """The earlier sampler: every non-greedy row sorts the whole vocabulary."""
    dev, vocab = logits.device, logits.shape[1]
    temp = torch.tensor([r.params.temperature for r in reqs], device=dev)
    sorted_logits, sorted_idx = (logits / temp[:, None]).sort(dim=-1, descending=True)
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in reqs], device=dev)
    sorted_logits = sorted_logits.masked_fill(torch.arange(vocab, device=dev)[None, :] >= top_k[:, None],
                                              float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([r.params.top_p for r in reqs], device=dev)
    drop = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    probs = probs.masked_fill(drop, 0.0)
    choice = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)
    return sorted_idx.gather(1, choice[:, None]).squeeze(1).tolist()


def timed(fn, dev, iters):
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def gpu_time(fn, n):
    """Seconds of device time per call over n calls launched back to back (CUDA events)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / n


def graph_time(fn, n=20):
    """Seconds of device time per call: n calls captured in one CUDA graph, the graph replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay()
    return gpu_time(g.replay, 5) / n


def host_time(fn, n=50):
    """Seconds of host time per call over n calls without a sync (the GPU queue absorbs them)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / n


def jit_launch(logits, num_warps=None, programs_per_sm=None):
    """One draw of every row (temperature 1, key 7) launched through Triton's JITFunction, as Kernels.sample
    launched it before 1b0bfcd; num_warps / programs_per_sm: other warps or split of the rows (the sweep)."""
    from epplat.platforms.cuda import triton_sample as ts
    b, vocab = logits.shape
    dev = logits.device
    tiles = -(-vocab // ts.BLOCK)
    programs = (programs_per_sm or ts.PROGRAMS_PER_SM) * torch.cuda.get_device_properties(dev).multi_processor_count
    tpp = -(-tiles // max(1, min(tiles, -(-programs // b))))
    splits = -(-tiles // tpp)
    out = torch.empty(b, dtype=torch.int64, device=dev)
    acc, cnt = ts._row_scratch(dev, b)
    ts._race_kernel.jit[(b, splits)](logits, logits.stride(0), vocab, b, out, acc, cnt, 7, 0, 1.0, out, tpp, splits,
                                     False, True, ts.BLOCK, num_warps=num_warps or ts.WARPS)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--logit-std", type=float, default=4.0)
    p.add_argument("--iters", type=int, default=0, help="timed repeats (default: 20 on cuda, 5 on cpu)")
    p.add_argument("--sweep", action="store_true", help="the kernel's device time at other warps / splits (cuda)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = torch.device(a.device)
    platform = registry().load("platform", dev.type)()
    kernels = platform.kernels
    iters = a.iters or (20 if dev.type == "cuda" else 5)
    g = torch.Generator(device=dev).manual_seed(0)
    rows, sweep = [], []
    for b in a.batch:
        logits = torch.randn(b, a.vocab, device=dev, generator=g) * a.logit_std
        row = {"batch": b}
        platform.before_step(b)        # threads as in a decode step of b tokens (cpu: torch on one below 128)
        for name, params in CASES.items():
            reqs = [Request(EngineRequest(str(i), [1], SamplingParams(**params))) for i in range(b)]
            med, low = timed(lambda: sample(logits, reqs, kernels=kernels), dev, iters)
            row[name], row["min " + name] = med * 1e3, low * 1e3
            if name == "temperature 1.0":
                if dev.type == "cuda" and kernels.sample is not None:   # device time of the kernel alone
                    row["kernel GPU time"] = row["min kernel GPU time"] = gpu_time(
                        lambda: kernels.sample(logits, 1.0, 7), 50) * 1e3
                    row["argmax GPU time"] = row["min argmax GPU time"] = gpu_time(
                        lambda: logits.argmax(dim=-1), 50) * 1e3
                    for label, fn in (("kernel", lambda: kernels.sample(logits, 1.0, 7)),
                                      ("argmax", lambda: logits.argmax(dim=-1))):
                        try:
                            row[label + " graph time"] = row["min " + label + " graph time"] = graph_time(fn) * 1e3
                        except Exception as e:      # noqa: BLE001 - reported, the other columns still print
                            print(f"batch {b}: {label} in a CUDA graph failed: {type(e).__name__}: {e}")
                            row[label + " graph time"] = row["min " + label + " graph time"] = float("nan")
                    row["launch host (cached)"] = row["min launch host (cached)"] = host_time(
                        lambda: kernels.sample(logits, 1.0, 7)) * 1e3
                    row["launch host (JIT)"] = row["min launch host (JIT)"] = host_time(
                        lambda: jit_launch(logits)) * 1e3
                    if a.sweep and b >= 64:
                        for w in (4, 8):
                            for pps in (4, 8, 16):
                                sweep.append((b, w, pps, graph_time(lambda: jit_launch(logits, w, pps)) * 1e3))
                med, low = timed(lambda: sample(logits, reqs), dev, iters)
                row[name + " (torch)"], row["min " + name + " (torch)"] = med * 1e3, low * 1e3
            if name in ("temperature 1.0", "top-p 0.9"):
                med, low = timed(lambda: full_sort(logits, reqs), dev, iters)
                row[name + " (full sort)"], row["min " + name + " (full sort)"] = med * 1e3, low * 1e3
        probs = (logits[0] / 1.0).softmax(-1).sort(descending=True).values.cumsum(-1)
        row["top-p 0.9 tokens"] = int((probs < 0.9).sum()) + 1
        rows.append(row)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.max_threads} threads)"
    print(f"sampler on {name}, vocab {a.vocab}, logit std {a.logit_std}, ms per sample() call, torch "
          f"{torch.__version__}, sample kernel: {kernels.sample is not None}")
    for title, cols in (("median", [c for c in rows[0] if c != "batch" and not c.startswith("min ")]),
                        ("min", [c for c in rows[0] if c.startswith("min ")])):
        print(f"{title} ms:\n{'batch':>6}" + "".join(f"{c.removeprefix('min ')[:22]:>23}" for c in cols))
        for r in rows:
            print(f"{r['batch']:>6}" + "".join(f"{r[c]:>23.3f}" if isinstance(r[c], float) else f"{r[c]:>23}"
                                               for c in cols))
    for k in ("", "min "):
        for path in ("temperature 1.0", "temperature 1.0 (torch)"):
            print(f"{k or 'median '}{path} / greedy: "
                  + ", ".join(f"batch {r['batch']} {r[k + path] / r[k + 'greedy']:.2f}x" for r in rows))
    if sweep:
        print("kernel device time in a CUDA graph (ms) by warps and programs per multiprocessor:")
        for b, w, pps, ms in sweep:
            print(f"  batch {b:>4}  num_warps {w}  programs/SM {pps:>2}  {ms:.4f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "device": name, "rows": rows, "sweep": sweep}, f, indent=2)


if __name__ == "__main__":
    main()
