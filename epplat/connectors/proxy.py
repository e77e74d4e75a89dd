"""``epplat proxy``: the prefill/decode proxy, with the flags and policy of vllm-ascend's
load_balance_proxy_server_example.py. It speaks only the OpenAI protocol, so it chains vLLM servers
as well as epplat's.

Each /v1/completions or /v1/chat/completions request goes first to the least loaded prefiller
(score: its active prompt tokens) as a copy with max_tokens 1, no streaming and
``kv_transfer_params.do_remote_decode``; the ``kv_transfer_params`` it answers with go with the
original request to the least loaded decoder (its active tokens), whose answer, streamed or not,
is passed back as it comes. Both calls carry the same X-Request-Id. A failed call is retried
(--max-retries, doubling from --retry-delay seconds); a client that disconnects closes the upstream
call in flight, which aborts the request on that server (on the prefiller, before it holds any
blocks for a decoder; no decoder is then called). GET /healthcheck reports the instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import uuid
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

logger = logging.getLogger(__name__)


@dataclass
class Instance:
    url: str
    active_tokens: int = 0
    active_requests: int = 0

    def score(self) -> tuple[int, int]:
        return self.active_tokens, self.active_requests


def _prefill_body(body: dict, chat: bool) -> dict:
    req = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "min_tokens")}
    req["max_tokens"] = 1
    if chat and "max_completion_tokens" in req:
        req["max_completion_tokens"] = 1
    req["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                 "remote_block_ids": None, "remote_host": None, "remote_port": None}
    return req


def _cost(body: dict) -> int:
    """A request's load on an instance: its prompt's length (characters, or token ids) plus its max tokens."""
    prompt = body.get("prompt") if "prompt" in body else body.get("messages")
    size = len(json.dumps(prompt)) // 4 if prompt is not None else 0
    return size + int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)


async def _disconnected(raw: Request) -> None:
    """Returns when the client goes away (the body is read: the next ASGI message is the disconnect)."""
    while (await raw.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(raw: Request, work):
    """work's result, or None when the client disconnects first: work is then cancelled, which closes its
    upstream call (and so aborts the request on that server)."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(raw))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def build_app(prefillers: list[str], decoders: list[str], max_retries: int = 3, retry_delay: float = 0.001):
    app = FastAPI()
    pre = [Instance(u) for u in prefillers]
    dec = [Instance(u) for u in decoders]
    counter = itertools.count()
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), trust_env=False)

    def pick(pool: list[Instance]) -> Instance:
        best = min(i.score() for i in pool)
        ties = [i for i in pool if i.score() == best]
        return ties[next(counter) % len(ties)]

    async def call(inst: Instance, path: str, body: dict, headers: dict, stream: bool) -> httpx.Response:
        """A call with retries (connection errors and 5xx answers, waits doubling); a 4xx answer is the
        client's and comes back as it is. With `stream`, the body is left to read."""
        delay = retry_delay
        for attempt in range(max_retries + 1):
            last = attempt == max_retries
            try:
                r = await client.send(client.build_request("POST", inst.url + path, json=body, headers=headers),
                                      stream=stream)
                if r.status_code < 500 or last:
                    return r
                await r.aclose()
            except httpx.HTTPError:
                if last:
                    raise
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def handle(path: str, raw: Request, chat: bool):
        try:
            body = await raw.json()
        except ValueError:
            return JSONResponse({"error": {"message": "the body is not JSON", "type": "BadRequestError",
                                           "code": 400}}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": {"message": "the body must be a JSON object", "type": "BadRequestError",
                                           "code": 400}}, status_code=400)
        rid = raw.headers.get("X-Request-Id") or uuid.uuid4().hex
        headers = {"X-Request-Id": rid}
        if "authorization" in raw.headers:
            headers["Authorization"] = raw.headers["authorization"]
        cost = _cost(body)
        p = pick(pre)
        p.active_tokens += cost
        p.active_requests += 1
        try:
            r = await _unless_gone(raw, call(p, path, _prefill_body(body, chat), headers, stream=False))
        except httpx.HTTPError as e:
            return JSONResponse({"error": {"message": f"prefiller {p.url}: {e}", "type": "ServiceUnavailableError",
                                           "code": 503}}, status_code=503)
        finally:
            p.active_tokens -= cost
            p.active_requests -= 1
        if r is None:
            logger.info("request %s: the client left during its prefill on %s; aborted there", rid, p.url)
            return Response(status_code=499)
        if r.status_code != 200:
            return Response(r.content, status_code=r.status_code, media_type="application/json")
        dbody = dict(body)
        dbody["kv_transfer_params"] = r.json().get("kv_transfer_params")
        d = pick(dec)
        d.active_tokens += cost
        d.active_requests += 1
        try:
            upstream = await call(d, path, dbody, headers, stream=True)
        except httpx.HTTPError as e:
            d.active_tokens -= cost
            d.active_requests -= 1
            return JSONResponse({"error": {"message": f"decoder {d.url}: {e}", "type": "ServiceUnavailableError",
                                           "code": 503}}, status_code=503)

        async def relay():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:                    # done, or the client left: closing the call aborts it on the decoder
                await upstream.aclose()
                d.active_tokens -= cost
                d.active_requests -= 1

        return StreamingResponse(relay(), status_code=upstream.status_code,
                                 media_type=upstream.headers.get("content-type", "application/json"),
                                 headers={"X-Request-Id": rid})

    @app.post("/v1/completions")
    async def completions(raw: Request):
        return await handle("/v1/completions", raw, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request):
        return await handle("/v1/chat/completions", raw, chat=True)

    @app.get("/healthcheck")
    async def healthcheck():
        return {"status": "ok", "prefill_instances": len(pre), "decode_instances": len(dec)}

    @app.on_event("shutdown")
    async def _close():
        await client.aclose()

    return app


def _urls(hosts: list[str], ports: list[int], what: str) -> list[str]:
    if len(hosts) != len(ports):
        raise ValueError(f"--{what}-hosts and --{what}-ports must have the same length "
                         f"({len(hosts)} and {len(ports)})")
    return [f"http://{h}:{p}" for h, p in zip(hosts, ports)]


def add_cli(sub) -> None:
    p = sub.add_parser("proxy", help="prefill/decode proxy (vllm-ascend's load-balance proxy flags)",
                       description="Sends each request to a prefiller (max_tokens 1) and then, with the returned "
                                   "kv_transfer_params, to a decoder, streaming the decoder's answer back.")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prefiller-hosts", "--prefiller-host", nargs="+", default=["localhost"])
    p.add_argument("--prefiller-ports", "--prefiller-port", nargs="+", type=int, default=[8100])
    p.add_argument("--decoder-hosts", "--decoder-host", nargs="+", default=["localhost"])
    p.add_argument("--decoder-ports", "--decoder-port", nargs="+", type=int, default=[8200])
    p.add_argument("--max-retries", type=int, default=3, help="retries of a failed call to an instance")
    p.add_argument("--retry-delay", type=float, default=0.001, help="seconds before the first retry (doubling)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import sys

    import uvicorn
    try:
        pre = _urls(args.prefiller_hosts, args.prefiller_ports, "prefiller")
        dec = _urls(args.decoder_hosts, args.decoder_ports, "decoder")
        if args.max_retries < 0 or args.retry_delay < 0:
            raise ValueError("--max-retries and --retry-delay must be >= 0")
    except ValueError as e:
        print(f"epplat proxy: error: {e}", file=sys.stderr)
        return 2
    logger.info("proxy on %s:%d: prefillers %s, decoders %s", args.host, args.port, pre, dec)
    uvicorn.run(build_app(pre, dec, args.max_retries, args.retry_delay), host=args.host, port=args.port,
                log_level="info")
    return 0
