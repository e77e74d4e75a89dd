"""``epplat bench serve``: an async OpenAI-API load generator, like ``vllm bench serve``.

Sends ``num_prompts`` random prompts of exactly ``input_len`` tokens (random token ids
from the tokenizer's vocabulary, sent as a token-id list, or decoded to a text that
re-encodes to ``input_len`` tokens) with ``max_tokens=output_len``, ``ignore_eos`` and
``temperature=0``, so every request produces the same number of tokens; streams every
response, at a request rate (Poisson arrivals) and/or a fixed maximum concurrency, and
reports throughput, time to first token (TTFT), time per output token (TPOT) and
inter-token latency (ITL), with the same definitions and table as vLLM's benchmark:

- TTFT: from sending the request to the first streamed chunk that carries a token;
- ITL: the gaps between successive token chunks of one request;
- TPOT: ``(E2E latency - TTFT) / (output tokens - 1)`` per request;
- output tokens: the server's ``usage.completion_tokens`` (``stream_options.include_usage``).

Works against any OpenAI-compatible server (``epplat serve``, ``vllm serve``).
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
from typing import Optional, Union

from epplat.tools.sse_client import HTTPStatusError, SSEClient

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


@dataclass
class RequestResult:
    """What one streamed request measured (times in seconds)."""

    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    itl: list = field(default_factory=list)
    error: str = ""


# -- prompts ------------------------------------------------------------------------------

def load_tokenizer(tokenizer_dir: str):
    """The Hugging Face tokenizer in ``tokenizer_dir`` (local files only)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _vocab(tok) -> list[int]:
    special = set(tok.all_special_ids)
    return [i for i in range(len(tok)) if i not in special]


def random_prompts(tokenizer_dir: Union[str, object], num: int, input_len: int, seed: int = 0,
                   prefix_len: int = 0) -> list[list[int]]:
    """``num`` lists of ``input_len`` random non-special token ids (a tokenizer or its directory), each after
    the same ``prefix_len`` random ones (vLLM's ``--random-prefix-len``: a shared system prompt)."""
    tok = load_tokenizer(tokenizer_dir) if isinstance(tokenizer_dir, str) else tokenizer_dir
    vocab = _vocab(tok)
    rng = random.Random(seed)
    prefix = [rng.choice(vocab) for _ in range(prefix_len)]
    return [prefix + [rng.choice(vocab) for _ in range(input_len)] for _ in range(num)]


def random_text_prompts(tokenizer_dir: Union[str, object], num: int, input_len: int, seed: int = 0,
                        max_tries: int = 200) -> list[str]:
    """``num`` texts of random tokens, each re-encoding (no special tokens) to exactly ``input_len`` tokens.

    Decoding random ids and encoding the text again merges or splits tokens, so each
    prompt is corrected until it holds: truncated when too long, topped up with random
    ids when too short. Raises ValueError if a prompt cannot be made in ``max_tries``.
    """
    tok = load_tokenizer(tokenizer_dir) if isinstance(tokenizer_dir, str) else tokenizer_dir
    # byte-level pieces that are not whole UTF-8 characters decode to U+FFFD: leave them out
    vocab = [i for i in _vocab(tok) if (s := tok.decode([i])) and "\ufffd" not in s]
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        ids = [rng.choice(vocab) for _ in range(input_len)]
        for attempt in range(max_tries):
            text = tok.decode(ids)
            again = tok.encode(text, add_special_tokens=False)
            if len(again) == input_len:
                out.append(text)
                break
            keep = min(len(again), input_len) - min(attempt, input_len // 2)  # a fresh, longer tail each try
            ids = again[:max(keep, 0)]
            ids += [rng.choice(vocab) for _ in range(input_len - len(ids))]
        else:
            raise ValueError(f"could not make a text prompt of exactly {input_len} tokens in {max_tries} tries")
    return out


# -- one request --------------------------------------------------------------------------

def _is_token_chunk(chunk: dict, chat: bool) -> bool:
    """Whether a streamed chunk carries generated tokens (not the usage chunk nor chat's role chunk)."""
    choices = chunk.get("choices")
    if not choices:
        return False
    if not chat:
        return True
    c = choices[0]
    delta = c.get("delta") or {}
    return not ("role" in delta and not delta.get("content") and not c.get("finish_reason"))


async def _one(client: SSEClient, path: str, body: dict, chat: bool) -> RequestResult:
    res = RequestResult()
    start = last = time.perf_counter()
    try:
        async for line in client.post_lines(path, body):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                res.error = f"error in the stream: {chunk['error']}"[:300]
                return res
            now = time.perf_counter()
            if _is_token_chunk(chunk, chat):
                if res.ttft == 0.0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
            if chunk.get("usage"):
                res.output_tokens = chunk["usage"].get("completion_tokens") or 0
                res.prompt_tokens = chunk["usage"].get("prompt_tokens") or 0
        res.latency = time.perf_counter() - start
        res.ok = res.output_tokens > 0 and res.ttft > 0.0
        if not res.ok:
            res.error = "no tokens or no usage in the stream"
    except HTTPStatusError as e:
        text = e.body
        try:
            text = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        res.error = f"HTTP {e.status}: {text[:300]}"
    except Exception as e:  # noqa: BLE001 - any failure is this request's, never the run's
        res.error = f"{type(e).__name__}: {e}"[:300]
    return res


def _body(model: str, prompt, output_len: int, chat: bool) -> dict:
    body = {"model": model, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def _run(base_url, model, prompts, output_len, concurrency, request_rate, seed, headers, endpoint, warmup):
    chat = endpoint.rstrip("/").endswith("chat/completions")
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    rng = random.Random(seed)
    client = SSEClient(base_url, headers)
    if warmup:  # one untimed request, as vLLM's "initial test run": fail fast on a bad setup
        test = await _one(client, endpoint, _body(model, prompts[0], min(output_len, 4), chat), chat)
        if not test.ok:
            raise RuntimeError(f"the initial test request failed: {test.error}")

    async def limited(p):
        if sem is None:
            return await _one(client, endpoint, _body(model, p, output_len, chat), chat)
        async with sem:
            return await _one(client, endpoint, _body(model, p, output_len, chat), chat)

    tasks = []
    start = time.perf_counter()
    for p in prompts:
        tasks.append(asyncio.create_task(limited(p)))
        if math.isfinite(request_rate) and request_rate > 0:
            await asyncio.sleep(rng.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def percentile(xs, q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default); 0.0 when empty."""
    if not xs:
        return 0.0
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def served_models(base_url: str, api_key: Optional[str] = None) -> list[dict]:
    """The ``data`` list of ``GET /v1/models``."""
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30, trust_env=False)
    r.raise_for_status()
    return r.json()["data"]


def run_benchmark(base_url: str, model: Optional[str] = None, *, num_prompts: int = 64, input_len: int = 128,
                  output_len: int = 64, concurrency: Optional[int] = None, request_rate: float = math.inf,
                  seed: int = 0, tokenizer_dir: Optional[str] = None, api_key: Optional[str] = None,
                  endpoint: str = COMPLETIONS, prompt_as_token_ids: bool = True, warmup: bool = True,
                  prefix_len: int = 0) -> dict:
    """Run the load against a live server; returns the metrics as a dict (latencies in ms).

    ``model`` defaults to the first served model; ``tokenizer_dir`` to that model's
    ``root`` (its checkpoint directory for both epplat and vLLM). With
    ``prompt_as_token_ids`` the prompt is the token-id list (exactly ``input_len``
    tokens on the server); otherwise, and always for the chat endpoint, a text that
    re-encodes to ``input_len`` tokens (the chat template adds its own tokens). ``prefix_len``
    shared tokens go before every token-id prompt (the warmup request is one of them, so the
    shared prefix is in a prefix cache before the timed requests, as a deployed system prompt is).
    """
    base_url = base_url.rstrip("/")
    if model is None or tokenizer_dir is None:
        models = served_models(base_url, api_key)
        if not models:
            raise RuntimeError(f"{base_url}/v1/models lists no model")
        entry = next((m for m in models if m["id"] == model), models[0])
        model = model or entry["id"]
        tokenizer_dir = tokenizer_dir or entry.get("root") or model
    chat = endpoint.rstrip("/").endswith("chat/completions")
    tok = load_tokenizer(tokenizer_dir)
    if prompt_as_token_ids and not chat:
        prompts = random_prompts(tok, num_prompts, input_len, seed, prefix_len)
    elif prefix_len:
        raise ValueError("a shared prefix (--random-prefix-len) needs token-id prompts on /v1/completions")
    else:
        prompts = random_text_prompts(tok, num_prompts, input_len, seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results, duration = asyncio.run(_run(base_url, model, prompts, output_len, concurrency, request_rate, seed,
                                         headers, endpoint, warmup))
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    ttft = [r.ttft for r in ok]
    e2e = [r.latency for r in ok]
    ms = 1000.0
    out = {
        "model": model, "endpoint": endpoint, "prompt_as_token_ids": bool(prompt_as_token_ids and not chat),
        "num_prompts": num_prompts, "prefix_len": prefix_len, "input_len": input_len, "output_len": output_len,
        "max_concurrency": concurrency, "request_rate": request_rate if math.isfinite(request_rate) else "inf",
        "duration_s": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + in_tokens) / duration,
    }
    for key, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2e)):
        out[f"mean_{key}_ms"] = statistics.fmean(xs) * ms if xs else 0.0
        out[f"median_{key}_ms"] = percentile(xs, 50) * ms
        out[f"p99_{key}_ms"] = percentile(xs, 99) * ms
    return out


def format_result(r: dict) -> str:
    """The result as vLLM's ``Serving Benchmark Result`` table."""
    conc = r.get("max_concurrency")
    rows = [("Successful requests:", r["completed"]), ("Failed requests:", r["failed"])]
    if conc:
        rows.append(("Maximum request concurrency:", conc))
    rows += [("Benchmark duration (s):", f"{r['duration_s']:.2f}"),
             ("Total input tokens:", r["total_input_tokens"]),
             ("Total generated tokens:", r["total_output_tokens"]),
             ("Request throughput (req/s):", f"{r['request_throughput']:.2f}"),
             ("Output token throughput (tok/s):", f"{r['output_throughput']:.2f}"),
             ("Total token throughput (tok/s):", f"{r['total_token_throughput']:.2f}")]
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]
    lines += ["{:<40} {:<10}".format(k, v) for k, v in rows]
    for title, key in (("Time to First Token", "ttft"), ("Time per Output Token (excl. 1st token)", "tpot"),
                       ("Inter-token Latency", "itl")):
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            lines.append("{:<40} {:<10.2f}".format(f"{label} {key.upper()} (ms):", r[f"{stat}_{key}_ms"]))
    lines.append("=" * 50)
    for e in r.get("errors") or []:
        lines.append(f"error: {e}")
    return "\n".join(lines)


# -- CLI ----------------------------------------------------------------------------------

def add_cli(sub) -> None:
    """Register ``serve`` on the ``epplat bench`` subparsers."""
    p = sub.add_parser("serve", help="load-test a running OpenAI-compatible server (like `vllm bench serve`)",
                       description="Random prompts of fixed input/output length against a running server; "
                                   "prints vLLM's 'Serving Benchmark Result' table.")
    p.add_argument("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default=COMPLETIONS, help=f"{COMPLETIONS} (default) or {CHAT}")
    p.add_argument("--model", default=None, help="model name (default: the first one in /v1/models)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the served model's root)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-prefix-len", type=int, default=0,
                   help="random tokens shared by every prompt, before its --random-input-len ones")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default: inf)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--text-prompts", action="store_true",
                   help="send texts that re-encode to the input length instead of token-id lists")
    p.add_argument("--no-warmup", action="store_true", help="skip the initial untimed test request")
    p.add_argument("--result-json", default=None, help="write the result dict to this file")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    try:
        import httpx
    except ImportError:
        print("epplat bench serve: error: needs the httpx package (pip install 'epplat[bench]')", file=sys.stderr)
        return 1
    for name in ("num_prompts", "random_input_len", "random_output_len"):
        if getattr(args, name) <= 0:
            print(f"epplat bench serve: error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    if args.random_prefix_len < 0:
        print("epplat bench serve: error: --random-prefix-len must be >= 0", file=sys.stderr)
        return 2
    if args.max_concurrency is not None and args.max_concurrency <= 0:
        print("epplat bench serve: error: --max-concurrency must be positive", file=sys.stderr)
        return 2
    if not args.request_rate > 0:
        print("epplat bench serve: error: --request-rate must be positive", file=sys.stderr)
        return 2
    url = args.base_url or f"http://{args.host}:{args.port}"
    try:
        r = run_benchmark(url, args.model, num_prompts=args.num_prompts, input_len=args.random_input_len,
                          output_len=args.random_output_len, concurrency=args.max_concurrency,
                          request_rate=args.request_rate, seed=args.seed, tokenizer_dir=args.tokenizer,
                          api_key=args.api_key, endpoint=args.endpoint, prompt_as_token_ids=not args.text_prompts,
                          warmup=not args.no_warmup, prefix_len=args.random_prefix_len)
    except httpx.HTTPError as e:
        print(f"epplat bench serve: error: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, ValueError, OSError) as e:
        print(f"epplat bench serve: error: {e}", file=sys.stderr)
        return 1
    print(format_result(r))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(r, f, indent=2)
    return 0 if r["failed"] == 0 else 1
