"""OpenAI completions and chat completions: requests -> engine calls -> JSON or SSE responses."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from epplat.core.engine.client import CompletionOutput, EngineError
from epplat.core.engine.protocol import SamplingParams
from epplat.core.server.protocol import ChatCompletionRequest, CompletionRequest


class APIError(Exception):
    """An error for the client, rendered as an OpenAI error body with this HTTP status."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 500: "InternalServerError"}

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param)


def error_response(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": APIError.TYPES.get(status, "BadRequestError"),
                                   "param": param, "code": status}}, status_code=status)


@dataclass
class _Choice:
    index: int
    text: str = ""
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: object = None
    num_prompt: int = 0


class OpenAIServing:
    def __init__(self, client, served_model_names: list[str], metrics):
        self.client, self.names, self.metrics = client, served_model_names, metrics
        self.tok = client.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.client.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.client.vocab_size

    # -- validation ----------------------------------------------------------------------
    def check_model(self, name: Optional[str]) -> str:
        if name is None:
            return self.names[0]
        if name not in self.names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")
        return name

    def _prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt")
        if not (all(isinstance(p, str) for p in prompts) or all(isinstance(p, list) for p in prompts)):
            raise APIError(400, "prompt must be a string, a list of strings, token ids or lists of token ids",
                           "prompt")
        out = []
        for p in prompts:
            ids = self.tok.encode(p, add_special_tokens=True) if isinstance(p, str) else p
            if not ids:
                raise APIError(400, "prompt must not be empty", "prompt")
            if any((not isinstance(t, int)) or t < 0 or t >= self.vocab_size for t in ids):
                raise APIError(400, f"token ids must be integers in [0, {self.vocab_size})", "prompt")
            out.append(ids)
        return out

    def _params(self, req, prompt_len: int, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported yet", name)
        if req.repetition_penalty != 1.0:
            raise APIError(400, "repetition_penalty is not supported yet", "repetition_penalty")
        if prompt_len >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"your prompt has {prompt_len} tokens.", "prompt")
        if max_tokens is None:
            max_tokens = self.max_model_len - prompt_len
        elif prompt_len + max_tokens > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                                f"{max_tokens} in the completion).", "max_tokens")
        if req.stop_token_ids and any(t < 0 or t >= self.vocab_size for t in req.stop_token_ids):
            raise APIError(400, "stop_token_ids out of the vocabulary", "stop_token_ids")
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
            seed=req.seed, stop=list(req.stop or []), stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos, logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output)

    # -- running sub-requests ------------------------------------------------------------
    async def _run_one(self, rid: str, ids: list[int], params: SamplingParams) -> AsyncIterator[CompletionOutput]:
        start = last = time.monotonic()
        first, reason, produced = True, "abort", 0
        try:
            async for out in self.client.generate(rid, ids, params):
                now = time.monotonic()
                if out.token_ids:
                    (self.metrics.ttft if first else self.metrics.itl).labels(self.metrics.model).observe(now - last)
                    first, last = False, now
                produced = out.num_output_tokens
                reason = out.finish_reason or reason
                yield out
        finally:
            self.metrics.finished(reason, len(ids), produced, time.monotonic() - start)

    def _jobs(self, base_id: str, prompts, params_for, n: int):
        jobs = []
        for i, ids in enumerate(prompts):
            params = params_for(len(ids))
            for j in range(n):
                p = params if params.seed is None or n == 1 else _with_seed(params, params.seed + j)
                jobs.append((i * n + j, f"{base_id}-{i}-{j}", ids, p))
        return jobs

    async def _merged(self, jobs) -> AsyncIterator[tuple[int, CompletionOutput]]:
        """Run every job concurrently and yield (choice index, delta) as they arrive."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index, rid, ids, params):
            try:
                async for out in self._run_one(rid, ids, params):
                    queue.put_nowait((index, out))
            except Exception as e:  # surfaced to the consumer
                queue.put_nowait((index, e))
            finally:
                queue.put_nowait((index, done))

        tasks = [asyncio.create_task(pump(*job)) for job in jobs]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, jobs, raw: Request) -> dict[int, _Choice]:
        choices = {idx: _Choice(idx, num_prompt=len(ids)) for idx, _, ids, _ in jobs}

        async def consume():
            async for idx, out in self._merged(jobs):
                c = choices[idx]
                c.text += out.text
                c.token_ids += out.token_ids
                if out.logprobs:
                    c.logprobs += out.logprobs
                if out.finish_reason:
                    c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason

        task = asyncio.create_task(consume())
        while not task.done():
            await asyncio.wait({task}, timeout=0.1)
            if not task.done() and await raw.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise APIError(499, "client disconnected")
        task.result()
        return choices

    # -- completions ---------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request):
        model = self.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported yet", "echo")
        prompts = self._prompts(req.prompt)
        jobs = self._jobs(f"cmpl-{uuid.uuid4().hex}", prompts,
                          lambda n: self._params(req, n, req.max_tokens, req.logprobs), req.n)
        rid, created = jobs[0][1].rsplit("-", 2)[0], int(time.time())
        echo = {idx: self.tok.decode(ids) if req.echo else "" for idx, _, ids, _ in jobs}
        if req.stream:
            return self._sse(self._completion_stream(jobs, rid, created, model, req, echo))
        choices = await self._run_collect(jobs, raw)
        return {
            "id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": c.index, "text": echo[c.index] + c.text, "finish_reason": c.finish_reason,
                         "stop_reason": c.stop_reason,
                         "logprobs": self._completion_logprobs(c.logprobs) if req.logprobs is not None else None}
                        for c in sorted(choices.values(), key=lambda c: c.index)],
            "usage": _usage(prompts, choices.values()),
        }

    async def _completion_stream(self, jobs, rid, created, model, req, echo):
        base = {"id": rid, "object": "text_completion", "created": created, "model": model}
        out_tokens, first = 0, set()
        async for idx, out in self._merged(jobs):
            out_tokens += len(out.token_ids)
            text = out.text if idx in first else echo[idx] + out.text
            first.add(idx)
            lp = self._completion_logprobs(out.logprobs or []) if req.logprobs is not None else None
            yield {**base, "choices": [{"index": idx, "text": text, "logprobs": lp,
                                        "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}]}
        if req.stream_options and req.stream_options.include_usage:
            prompt_tokens = sum(len(ids) for ids in {id(j[2]): j[2] for j in jobs}.values())
            yield {**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": out_tokens,
                                                    "total_tokens": prompt_tokens + out_tokens}}

    def _completion_logprobs(self, entries) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        pos = 0
        for e in entries:
            s = self.tok.decode([e[0].token_id])
            tokens.append(s)
            lps.append(e[0].logprob)
            tops.append({self.tok.decode([x.token_id]): x.logprob for x in e})
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    # -- chat ----------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, raw: Request):
        model = self.check_model(req.model)
        messages = [{"role": m.role, "content": _content_text(m.content)} for m in req.messages]
        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt,
                                                tokenize=False, **(req.chat_template_kwargs or {}))
        except Exception as e:
            raise APIError(400, f"cannot apply the chat template: {e}", "messages") from None
        ids = self.tok.encode(text, add_special_tokens=False)
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        jobs = self._jobs(f"chatcmpl-{uuid.uuid4().hex}", [ids], lambda n: self._params(req, n, max_tokens, logprobs),
                          req.n)
        rid, created = jobs[0][1].rsplit("-", 2)[0], int(time.time())
        if req.stream:
            return self._sse(self._chat_stream(jobs, rid, created, model, req))
        choices = await self._run_collect(jobs, raw)
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": self._chat_logprobs(c.logprobs, req.top_logprobs or 0) if req.logprobs else None,
                         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                        for c in sorted(choices.values(), key=lambda c: c.index)],
            "usage": _usage([ids], choices.values()),
        }

    async def _chat_stream(self, jobs, rid, created, model, req):
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        for idx, *_ in jobs:
            yield {**base, "choices": [{"index": idx, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}
        out_tokens = 0
        async for idx, out in self._merged(jobs):
            out_tokens += len(out.token_ids)
            lp = self._chat_logprobs(out.logprobs or [], req.top_logprobs or 0) if req.logprobs else None
            delta = {"content": out.text} if out.text or not out.finish_reason else {}
            yield {**base, "choices": [{"index": idx, "delta": delta, "logprobs": lp,
                                        "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}]}
        if req.stream_options and req.stream_options.include_usage:
            p = len(jobs[0][2])
            yield {**base, "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": out_tokens,
                                                    "total_tokens": p + out_tokens}}

    def _chat_logprobs(self, entries, top: int) -> dict:
        def item(x):
            s = self.tok.decode([x.token_id])
            return {"token": s, "logprob": x.logprob, "bytes": list(s.encode("utf-8"))}
        return {"content": [{**item(e[0]), "top_logprobs": [item(x) for x in e[1:1 + top]]} for e in entries]}

    # -- plumbing ------------------------------------------------------------------------
    async def _run_collect(self, jobs, raw):
        try:
            return await self._collect(jobs, raw)
        except EngineError as e:
            raise APIError(500, str(e)) from None

    def _sse(self, chunks) -> StreamingResponse:
        async def gen():
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except EngineError as e:
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'InternalServerError', 'code': 500}})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    import msgspec
    return msgspec.structs.replace(params, seed=seed)


def _content_text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise APIError(400, f"message content of type {part.get('type')!r} is not supported", "messages")
        parts.append(part.get("text", ""))
    return "".join(parts)


def _usage(prompts, choices) -> dict:
    p = sum(len(x) for x in prompts)
    c = sum(len(ch.token_ids) for ch in choices)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
