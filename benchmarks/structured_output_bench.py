"""Output throughput of grammar-constrained against unconstrained decoding, the same load on one server.

One `epplat serve` on the benchmark checkpoint of serve_vs_vllm.py (random weights, `epplat
make-model`, --vocab-size of its tokenizer); --num-prompts completions of --output-len tokens
each (ignore_eos), --concurrency in flight, sampled at temperature 1, first without a constraint,
then with a JSON schema (structured_outputs json: an array of at least 200 short strings,
disable_any_whitespace, so no output can end before --output-len), alternating for --rounds rounds
side by side. Throughput is generated tokens (usage) over the wall time of the round; the cost is
also given as the median over rounds of each constrained round against the unconstrained round just
before it (adjacent rounds share the machine's load best), with the load average before and after.
Each round also gives the CPU time the server's processes spent (user + system, from /proc) per
generated token: on a shared machine it moves less with the neighbours' load than the wall time does.

--mask-only times just the grammar's work of one engine step instead, in this process, as the engine
does it: for a batch of --concurrency rows under the schema, the one batched xgrammar call that fills
the step's token bitmask (``fill_bitmask``, on the calling thread), the bitmask applied to the logits in
place through the platform's ``Kernels.apply_bitmask`` (``apply_grammars``; the cpu platform's C kernel,
torch ops where a platform has none) and the matchers advanced (``accept``), over --output-len steps
(median and min of each part; random logits on the platform's device, the most probable allowed
token taken).

    python benchmarks/structured_output_bench.py --out structured.json
    python benchmarks/structured_output_bench.py --mask-only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_vs_vllm import SHAPE, busy_warning, free_port, start, stop  # noqa: E402

SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 200}


def cpu_seconds(session: int) -> float:
    """User + system CPU seconds of the live processes of a process session (the server's), from /proc."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:       # field 6 of stat: the session id
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def one_round(url: str, args, constrained: bool) -> tuple[float, int]:
    """(seconds, generated tokens) of the whole load."""
    extra = {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}} if constrained else {}
    sem = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as c:
        async def go(i):
            async with sem:
                r = await c.post("/v1/completions", json={"prompt": f"Item {i}:", "max_tokens": args.output_len,
                                                          "temperature": 1.0, "seed": i, "ignore_eos": True, **extra})
                r.raise_for_status()
                body = r.json()
                if constrained:     # an unfinished array of strings: a prefix of valid JSON
                    assert body["choices"][0]["text"].startswith("["), body
                return body["usage"]["completion_tokens"]
        t = time.perf_counter()
        tokens = await asyncio.gather(*(go(i) for i in range(args.num_prompts)))
        return time.perf_counter() - t, sum(tokens)


def mask_only(args) -> None:
    from epplat.core.engine.protocol import EngineRequest, SamplingParams, StructuredOutput
    from epplat.core.engine.request import Request
    from epplat.core.engine.structured_output import Grammars, accept, apply_grammars, fill_bitmask
    from epplat.plugins import registry
    import torch
    name = registry().pick_platform()
    plat = registry().load("platform", name)()
    device = plat.device(0)
    spec = StructuredOutput("json", json.dumps(SCHEMA), any_whitespace=False)
    grammars = Grammars(args.model_dir, args.vocab_size)
    reqs = []
    for i in range(args.concurrency):
        r = Request(EngineRequest(str(i), [1], SamplingParams(structured_output=spec), eos_token_ids=[2]))
        r.grammar = grammars.matcher(spec, [2])
        reqs.append(r)
    parts: dict[str, list[float]] = {"fill": [], "apply": [], "accept": [], "all": []}
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(args.output_len):
        reqs = [r for r in reqs if r.finish_reason is None]      # as the engine: a finished grammar leaves the batch
        logits = torch.randn(len(reqs), args.vocab_size, generator=gen, device=device)
        t0 = time.perf_counter()
        bitmask = fill_bitmask(reqs, args.vocab_size)
        t1 = time.perf_counter()
        tokens = apply_grammars(logits, reqs, bitmask, plat.kernels, inplace=True).argmax(dim=-1).tolist()
        t2 = time.perf_counter()
        for r, tok in zip(reqs, tokens):
            r.finish_reason = accept(r, tok)
        t3 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            parts[k].append(v)
    print(f"grammar work per step on {name}, {args.concurrency} rows, vocabulary {args.vocab_size}, "
          f"{len(parts['all'])} steps (median / min ms): " + ", ".join(
              f"{k} {statistics.median(v) * 1e3:.3f} / {min(v) * 1e3:.3f}" for k, v in parts.items())
          + " (apply includes the argmax and the tokens' copy to the host)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=None, help="checkpoint (default: make the benchmark shape)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--mask-only", action="store_true", help="time the grammar's work per step alone")
    p.add_argument("--epplat-arg", action="append", default=[], help="one more epplat serve argument (repeatable)")
    args = p.parse_args(argv)
    logdir = tempfile.mkdtemp(prefix="epplat-structured-")
    if args.model_dir is None:
        args.model_dir = f"{logdir}/model"
        subprocess.run([sys.executable, "-m", "epplat.cli", "make-model", "qwen3_moe", args.model_dir, *SHAPE,
                        "--vocab-size", str(args.vocab_size)], check=True, capture_output=True)
    if args.mask_only:
        mask_only(args)
        return 0
    port = free_port()
    cmd = [sys.executable, "-m", "epplat.cli", "serve", args.model_dir, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "1024", "--disable-log-stats", *args.epplat_arg]
    busy = busy_warning("structured output")
    load_before = os.getloadavg()
    proc, _ = start(cmd, f"{logdir}/serve.log", port)
    url = f"http://127.0.0.1:{port}"
    rates: dict[str, list[float]] = {"unconstrained": [], "json schema": []}
    cpu_ms: dict[str, list[float]] = {"unconstrained": [], "json schema": []}     # server CPU ms per token
    try:
        asyncio.run(one_round(url, argparse.Namespace(**{**vars(args), "num_prompts": args.concurrency}), True))
        for _ in range(args.rounds):
            for name, constrained in (("unconstrained", False), ("json schema", True)):
                cpu0 = cpu_seconds(proc.pid)
                secs, tokens = asyncio.run(one_round(url, args, constrained))
                rates[name].append(tokens / secs)
                cpu_ms[name].append((cpu_seconds(proc.pid) - cpu0) / tokens * 1e3)
                print(f"{name}: {tokens} tokens in {secs:.2f} s = {tokens / secs:.1f} tok/s, server CPU "
                      f"{cpu_ms[name][-1]:.2f} ms/token", flush=True)
    finally:
        stop(proc)
    free, tight = statistics.median(rates["unconstrained"]), statistics.median(rates["json schema"])
    pairs = [1 - c / u for u, c in zip(rates["unconstrained"], rates["json schema"])]
    load = (load_before, os.getloadavg())
    print(f"median output throughput: unconstrained {free:.1f} tok/s, json schema {tight:.1f} tok/s "
          f"({(1 - tight / free) * 100:+.1f}% cost); per adjacent pair: "
          f"{', '.join(f'{x * 100:+.1f}%' for x in pairs)} (median {statistics.median(pairs) * 100:+.1f}%); "
          f"load average before {load[0][0]:.1f}, after {load[1][0]:.1f} on {len(os.sched_getaffinity(0))} CPUs")
    cf, cc = statistics.median(cpu_ms["unconstrained"]), statistics.median(cpu_ms["json schema"])
    print(f"median server CPU time per token: unconstrained {cf:.2f} ms, json schema {cc:.2f} ms ({(cc / cf - 1) * 100:+.1f}%)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "command": cmd, "cpu_busy_before": busy, "tok_per_s": rates, "server_cpu_ms_per_token": cpu_ms,
                       "pair_costs": pairs, "load_average": load}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
