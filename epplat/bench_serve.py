"""``epplat bench serve``: an OpenAI-API load generator, like ``vllm bench serve``.

Sends random prompts of exactly ``input_len`` token ids with ``max_tokens=output_len``
and ``ignore_eos`` (so every request produces the same number of tokens), streaming,
at a request rate or a fixed concurrency, and reports throughput, time to first
token (TTFT), time per output token (TPOT) and inter-token latency (ITL).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list = field(default_factory=list)
    error: str = ""


def random_prompts(tokenizer_dir: str, num: int, input_len: int, seed: int) -> list[list[int]]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(seed)
    return [[rng.choice(vocab) for _ in range(input_len)] for _ in range(num)]


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    res = RequestResult()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.latency = time.perf_counter() - start
        res.ok = res.output_tokens > 0
        if not res.ok:
            res.error = "no usage in the stream"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _run(base_url, model, prompts, output_len, concurrency, request_rate, seed, api_key):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency or 1000, max_keepalive_connections=concurrency or 1000)
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits, headers=headers) as client:
        async def limited(p):
            body = {"model": model, "prompt": p, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            if sem is None:
                return await _one(client, base_url + "/v1/completions", body)
            async with sem:
                return await _one(client, base_url + "/v1/completions", body)
        tasks = []
        start = time.perf_counter()
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _pct(xs, q):
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def run_benchmark(base_url: str, model: str | None = None, *, num_prompts: int = 64, input_len: int = 128,
                  output_len: int = 64, concurrency: int | None = None, request_rate: float = math.inf,
                  seed: int = 0, tokenizer_dir: str | None = None, api_key: str | None = None) -> dict:
    """Run the load against a live server; returns the metrics as a dict (times in ms)."""
    base_url = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    models = httpx.get(base_url + "/v1/models", headers=headers, timeout=30).json()["data"]
    model = model or models[0]["id"]
    tokenizer_dir = tokenizer_dir or models[0].get("root") or model
    prompts = random_prompts(tokenizer_dir, num_prompts, input_len, seed)
    results, duration = asyncio.run(_run(base_url, model, prompts, output_len, concurrency, request_rate, seed,
                                         api_key))
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    ttft = [r.ttft for r in ok]
    ms = 1000.0
    return {
        "duration_s": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "input_len": input_len, "output_len": output_len, "concurrency": concurrency,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + input_len * len(ok)) / duration,
        "total_output_tokens": out_tokens,
        "mean_ttft_ms": statistics.fmean(ttft) * ms if ttft else 0.0, "median_ttft_ms": _pct(ttft, 50) * ms,
        "p99_ttft_ms": _pct(ttft, 99) * ms,
        "mean_tpot_ms": statistics.fmean(tpot) * ms if tpot else 0.0, "median_tpot_ms": _pct(tpot, 50) * ms,
        "p99_tpot_ms": _pct(tpot, 99) * ms,
        "mean_itl_ms": statistics.fmean(itl) * ms if itl else 0.0, "median_itl_ms": _pct(itl, 50) * ms,
        "p99_itl_ms": _pct(itl, 99) * ms,
    }


def format_result(r: dict) -> str:
    rows = [("Successful requests:", r["completed"]), ("Failed requests:", r["failed"]),
            ("Benchmark duration (s):", f"{r['duration_s']:.2f}"),
            ("Total generated tokens:", r["total_output_tokens"]),
            ("Request throughput (req/s):", f"{r['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{r['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{r['total_token_throughput']:.2f}")]
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    lines += [f"{k:<40}{v:<10}" for k, v in rows]
    for name, key in (("Time to First Token", "ttft"), ("Time per Output Token (excl. 1st token)", "tpot"),
                      ("Inter-token Latency", "itl")):
        lines.append("{s:{c}^50}".format(s=f" {name} ", c="-"))
        for stat in ("mean", "median", "p99"):
            lines.append(f"{(stat.capitalize() if stat != 'p99' else 'P99') + ' ' + key.upper() + ' (ms):':<40}"
                         f"{r[f'{stat}_{key}_ms']:<10.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)


def add_cli(sub) -> None:
    p = sub.add_parser("serve", help="load-test a running OpenAI-compatible server")
    p.add_argument("--base-url", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the served model's root)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--request-rate", type=float, default=math.inf)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--result-json", default=None)
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    for name in ("num_prompts", "random_input_len", "random_output_len"):
        if getattr(args, name) <= 0:
            print(f"epplat bench serve: error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    url = args.base_url or f"http://{args.host}:{args.port}"
    try:
        r = run_benchmark(url, args.model, num_prompts=args.num_prompts, input_len=args.random_input_len,
                          output_len=args.random_output_len, concurrency=args.max_concurrency,
                          request_rate=args.request_rate, seed=args.seed, tokenizer_dir=args.tokenizer,
                          api_key=args.api_key)
    except httpx.HTTPError as e:
        print(f"epplat bench serve: error: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    print(format_result(r))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(r, f, indent=2)
    return 0 if r["failed"] == 0 else 1
