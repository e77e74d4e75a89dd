"""Completions and chat completions: OpenAI requests -> engine requests -> JSON bodies or SSE streams."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional, Union

import msgspec
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from epplat.core.engine.client import EngineError
from epplat.core.engine.protocol import SamplingParams
from epplat.core.server.body_check import choices_error, context_error, prompt_list
from epplat.core.server.chat_output import ChatOutputs
from epplat.core.server.metrics import Metrics
from epplat.core.server.structured import structured_output
from epplat.core.server.tool_choice import check_tool_choice, tool_constraint
from epplat.core.server.tokenizer import bad_words_token_ids
from epplat.core.server.tokenizer_pool import TokenizerPool
from epplat.core.server.protocol import (
    APIError, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse, ChatLogProb,
    ChatLogProbs, ChatLogProbsContent, ChatResponseMessage, ChatStreamChoice, CompletionChoice, CompletionLogProbs,
    CompletionRequest, CompletionResponse, CompletionResponseChoice, CompletionStreamResponse, DeltaMessage,
    PromptLogprob, UsageInfo)

logger = logging.getLogger("epplat.server")

DISCONNECT_POLL_S = 0.1
_MIN_LOGPROB = -9999.0   # JSON has no -inf; vLLM clamps the same way
_encode = msgspec.json.Encoder().encode


@dataclass
class _Job:
    """One engine request; its output is choice `index` of the response."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    kv_transfer_params: Optional[dict] = None
    priority: int = 0


@dataclass
class _Choice:
    """A choice's whole output (non-streaming)."""

    text: str = ""
    num_tokens: int = 0
    logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: object = None
    kv_transfer_params: Optional[dict] = None
    prompt_logprobs: Optional[list] = None


class OpenAIServing:
    """Turns validated requests into engine requests through `client` and their outputs into responses."""

    def __init__(self, client, served_model_names: list[str], metrics: Metrics, max_model_len: Optional[int] = None,
                 *, tokenizer_pool: TokenizerPool, max_choices: int = 128, trust_request_chat_template: bool = False,
                 sampling_defaults: Optional[dict] = None, max_logprobs: int = 20, tool_parser=None,
                 enable_auto_tool_choice: bool = False, reasoning_parser=None):
        self.client, self.names, self.metrics = client, list(served_model_names), metrics
        self.tok = client.tokenizer
        self.pool, self.max_choices, self.trust_template = tokenizer_pool, max_choices, trust_request_chat_template
        self._template_params = set(inspect.signature(self.tok.apply_chat_template).parameters) - {"kwargs"}
        self._max_model_len = max_model_len
        self.defaults = dict(sampling_defaults or {})    # --generation-config: for fields a request leaves unset
        self.max_logprobs = max_logprobs
        # --tool-call-parser / --reasoning-parser (instances; None without the flag)
        self.tool_parser, self.reasoning_parser = tool_parser, reasoning_parser
        self.auto_tools = enable_auto_tool_choice and tool_parser is not None
        self._token_str = functools.lru_cache(maxsize=1 << 17)(lambda t: self.tok.decode([t]))

    @property
    def max_model_len(self) -> int:
        # without an explicit limit the client knows it once its engines are up
        return self._max_model_len or self.client.max_model_len

    @property
    def vocab_size(self) -> int:
        return getattr(self.client, "vocab_size", 0) or len(self.tok)

    # -- completions ---------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        arrival, created = time.monotonic(), int(time.time())
        model = self.check_model(req.model)
        prompts = prompt_list(req.prompt)
        self._check_choices(len(prompts), req.n)
        ids = [self._check_ids(self._truncate(req, await self._encode(p, req.add_special_tokens, req)
                                              if isinstance(p, str) else list(p)))
               for p in prompts]
        ids = self._remote_prompt(req.kv_transfer_params) or ids
        self._check_kv(req.kv_transfer_params, req.n)
        base = self._base_id(raw)
        rid = f"cmpl-{base}"
        jobs = self._jobs(rid, ids, req.n, lambda plen: self._params(req, plen, req.max_tokens, req.logprobs),
                          req.kv_transfer_params, req.priority)
        echo = [(p if isinstance(p, str) else self.tok.decode(p)) if req.echo else ""
                for p in prompts for _ in range(req.n)]
        if req.stream:
            return _with_id(self._sse(self._completion_chunks(req, jobs, arrival, rid, created, model, echo)), base)
        choices = await self._collect(jobs, arrival, raw)
        out = []
        for i, c in enumerate(choices):
            lp = (self._completion_logprobs(c.logprobs, len(echo[i]), req.return_tokens_as_token_ids)[0]
                  if req.logprobs is not None else None)
            out.append(CompletionResponseChoice(index=i, text=echo[i] + c.text, logprobs=lp,
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                                prompt_logprobs=self._prompt_logprobs(c.prompt_logprobs)))
        return _with_id(_json(CompletionResponse(id=rid, created=created, model=model, choices=out,
                                                 usage=UsageInfo.of(sum(map(len, ids)),
                                                                    sum(c.num_tokens for c in choices)),
                                                 kv_transfer_params=choices[0].kv_transfer_params)), base)

    async def _completion_chunks(self, req, jobs, arrival, rid, created, model, echo):
        def chunk(choices, usage=None):
            return CompletionStreamResponse(id=rid, created=created, model=model, choices=choices, usage=usage)

        offsets = [len(e) for e in echo]
        started = [False] * len(jobs)
        num_tokens = [0] * len(jobs)
        async for i, out in self._merged(jobs, arrival):
            text = out.text if started[i] else echo[i] + out.text
            started[i] = True
            num_tokens[i] += len(out.token_ids)
            usage = UsageInfo.of(len(jobs[i].prompt_ids), num_tokens[i]) if req.continuous_usage else None
            if req.logprobs is None:
                yield completion_chunk_json(rid, created, model, i, text, out.finish_reason, out.stop_reason, usage)
                continue
            lp, offsets[i] = self._completion_logprobs(out.logprobs or [], offsets[i], req.return_tokens_as_token_ids)
            yield chunk([CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=out.finish_reason,
                                          stop_reason=out.stop_reason)], usage)
        if req.include_usage:
            yield chunk([], UsageInfo.of(sum(len(j.prompt_ids) for j in jobs[::req.n]), sum(num_tokens)))

    def _completion_logprobs(self, entries, offset: int, as_ids: Optional[bool]) -> tuple[CompletionLogProbs, int]:
        """The legacy format; `offset` is where the first token's text starts. Returns the next offset too."""
        lp = CompletionLogProbs()
        name = self._token_name(as_ids)
        for e in entries:
            s = name(e[0].token_id)
            lp.tokens.append(s)
            lp.token_logprobs.append(max(e[0].logprob, _MIN_LOGPROB))
            lp.top_logprobs.append({name(x.token_id): max(x.logprob, _MIN_LOGPROB) for x in e})
            lp.text_offset.append(offset)
            offset += len(s)
        return lp, offset

    def _token_name(self, as_ids: Optional[bool]) -> Callable[[int], str]:
        """How logprobs name a token: its text, or with return_tokens_as_token_ids "token_id:{id}" (vLLM's)."""
        return (lambda t: f"token_id:{t}") if as_ids else self._token_str

    def _prompt_logprobs(self, entries: Optional[list]):
        """vLLM's prompt_logprobs: None for the first prompt token, then {token id: Logprob} with the
        prompt token and the top alternatives."""
        if entries is None:
            return None
        return [None] + [{x.token_id: PromptLogprob(logprob=max(x.logprob, _MIN_LOGPROB), rank=x.rank,
                                                    decoded_token=self._token_str(x.token_id))
                          for x in reversed(e)} for e in entries]

    # -- chat ----------------------------------------------------------------------------
    async def chat_jobs(self, req: ChatCompletionRequest, raw: Request, prefix: str = "chatcmpl-"):
        """A chat request's engine jobs: (jobs, prompt ids, model name, X-Request-Id base, response id)."""
        model = self.check_model(req.model)
        self._check_choices(1, req.n)
        check_tool_choice(req, self.auto_tools)
        text = await self.render_chat(req)
        ids = self._check_ids(self._truncate(req, await self._encode(text, req.add_special_tokens, req)))
        ids = (self._remote_prompt(req.kv_transfer_params) or [ids])[0]
        self._check_kv(req.kv_transfer_params, req.n)
        base = self._base_id(raw)
        rid = f"{prefix}{base}"
        jobs = self._jobs(rid, [ids], req.n, lambda plen: self._params(req, plen, req.output_limit, req.num_logprobs),
                          req.kv_transfer_params, req.priority)
        return jobs, ids, model, base, rid

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        arrival, created = time.monotonic(), int(time.time())
        jobs, ids, model, base, rid = await self.chat_jobs(req, raw)
        if req.stream:
            return _with_id(self._sse(self._chat_chunks(req, jobs, arrival, rid, created, model)), base)
        choices = await self._collect(jobs, arrival, raw)
        parse = self._chat_outputs(req)
        out = []
        for i, c in enumerate(choices):
            msg = parse.whole(c.text)
            out.append(ChatChoice(
                index=i, message=ChatResponseMessage(reasoning_content=msg.reasoning_content, content=msg.content,
                                                     tool_calls=msg.tool_calls),
                logprobs=self._chat_logprobs(c.logprobs, req.top_logprobs, req.return_tokens_as_token_ids)
                if req.logprobs else None,
                finish_reason=parse.finish_reason(bool(msg.tool_calls), c.finish_reason), stop_reason=c.stop_reason))
        return _with_id(_json(ChatCompletionResponse(id=rid, created=created, model=model, choices=out,
                                                     usage=UsageInfo.of(len(ids), sum(c.num_tokens for c in choices)),
                                                     prompt_logprobs=self._prompt_logprobs(choices[0].prompt_logprobs),
                                                     kv_transfer_params=choices[0].kv_transfer_params)), base)

    async def _chat_chunks(self, req, jobs, arrival, rid, created, model):
        def chunk(choice, usage=None):
            return ChatCompletionStreamResponse(id=rid, created=created, model=model, choices=choice, usage=usage)

        prompt_len = len(jobs[0].prompt_ids)
        num_tokens = [0] * len(jobs)
        for job in jobs:
            yield chunk([ChatStreamChoice(index=job.index, delta=DeltaMessage(role="assistant", content=""))],
                        UsageInfo.of(prompt_len, 0) if req.continuous_usage else None)
        parse = self._chat_outputs(req)
        streams = [parse.stream() for _ in jobs]
        async for i, out in self._merged(jobs, arrival):
            num_tokens[i] += len(out.token_ids)
            delta = streams[i].feed(out.text, bool(out.finish_reason))
            lp = (self._chat_logprobs(out.logprobs or [], req.top_logprobs, req.return_tokens_as_token_ids)
                  if req.logprobs else None)
            if delta is None and not out.finish_reason and not (lp and lp.content):
                continue          # the parsers hold this text back until they know what it is
            yield chunk([ChatStreamChoice(index=i, delta=delta or DeltaMessage(), logprobs=lp,
                                          finish_reason=parse.finish_reason(streams[i].called, out.finish_reason),
                                          stop_reason=out.stop_reason)],
                        UsageInfo.of(prompt_len, num_tokens[i]) if req.continuous_usage else None)
        if req.include_usage:
            yield chunk([], UsageInfo.of(prompt_len, sum(num_tokens)))

    def _chat_logprobs(self, entries, top: Optional[int], as_ids: Optional[bool]) -> ChatLogProbs:
        name = self._token_name(as_ids)

        def item(x, cls=ChatLogProb, **kw):
            s = name(x.token_id)
            return cls(token=s, logprob=max(x.logprob, _MIN_LOGPROB), bytes=list(s.encode("utf-8", "replace")), **kw)
        top = top or 0
        return ChatLogProbs(content=[item(e[0], ChatLogProbsContent, top_logprobs=[item(x) for x in e[1:1 + top]])
                                     for e in entries])

    def _chat_outputs(self, req: ChatCompletionRequest) -> ChatOutputs:
        return ChatOutputs(req, self.tool_parser, self.reasoning_parser)

    async def render_chat(self, req) -> str:
        """A chat request's (or /tokenize's) messages, and its tools, through the chat template, as text."""
        options = {"add_generation_prompt": req.add_generation_prompt, "tokenize": False,
                   **({"continue_final_message": True} if req.continue_final_message else {}),
                   **self._template_options(req)}

        def render():      # in a template thread, messages and tools and all (a request may carry 100,000s)
            tools = [t.model_dump(exclude_none=True) for t in getattr(req, "tools", None) or []] or None
            return self.tok.apply_chat_template([_message(m) for m in req.messages], tools=tools, **options)
        try:
            return await self.pool.render(render)
        except APIError:
            raise
        except Exception as e:
            raise APIError(400, f"cannot apply the chat template: {e}", "messages") from None

    # -- validation and sampling settings --------------------------------------------------
    def _base_id(self, raw: Request) -> str:
        """The request's X-Request-Id header (as vLLM takes it), else a new one; 400 while one is in flight."""
        base = raw.headers.get("X-Request-Id") or uuid.uuid4().hex
        if any(rid.startswith((f"cmpl-{base}-", f"chatcmpl-{base}-", f"resp_{base}-"))
               for rid in getattr(self.client, "states", {})):
            raise APIError(400, f"a request with X-Request-Id {base!r} is already in flight")
        return base

    def _check_kv(self, params: Optional[dict], n: int) -> None:
        """A decode call for KV computed elsewhere needs a connector here, else it would silently compute
        from the (placeholder) prompt it carries; a P/D-split request has one choice (one prefill's blocks
        are held for, and read by, one decode request)."""
        if params and (params.get("do_remote_prefill") or params.get("do_remote_decode")) and n > 1:
            raise APIError(400, "n > 1 with a remote prefill or decode is not supported: one prefill's KV blocks "
                                "are read by one decode request (send n separate requests)", "n")
        cfg = getattr(self.client, "cfg", None)
        if params and params.get("do_remote_prefill") and getattr(cfg, "kv_transfer", None) is None:
            raise APIError(400, "kv_transfer_params.do_remote_prefill needs a KV connector on this server "
                                "(start it with --kv-transfer-config)", "kv_transfer_params")

    def _remote_prompt(self, params: Optional[dict]) -> Optional[list[list[int]]]:
        """A decode call for a prompt prefilled elsewhere continues that prompt (its tokens travel in
        kv_transfer_params), whatever placeholder prompt the call carries, as vLLM's PD clients expect."""
        if params and params.get("do_remote_prefill") and params.get("remote_prompt_token_ids"):
            return [self._check_ids(list(params["remote_prompt_token_ids"]))]
        return None

    def check_model(self, name: Optional[str]) -> str:
        if name is None:
            return self.names[0]
        if name not in self.names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")
        return name

    def _check_choices(self, num_prompts: int, n: int) -> None:
        err = choices_error(num_prompts, n, self.max_choices)
        if err:
            raise err

    def _template_options(self, req) -> dict:
        """chat_template_kwargs (variables for the template) and a caller's own template, if trusted."""
        kwargs = dict(req.chat_template_kwargs or {})
        template = kwargs.pop("chat_template", None) or req.chat_template
        if template is not None:
            if not self.trust_template:
                raise APIError(400, "Chat templates in requests are not accepted by this server "
                                    "(it runs with the model's own template; see --trust-request-chat-template).",
                               "chat_template")
            kwargs["chat_template"] = template
        clash = sorted(set(kwargs) & self._template_params - {"chat_template"})
        if clash:
            raise APIError(400, f"chat_template_kwargs may not set {clash[0]!r} (it is a rendering option, not a "
                                "template variable).", "chat_template_kwargs")
        return kwargs

    async def _encode(self, text: str, add_special_tokens: bool, req=None) -> list[int]:
        """The text's ids (a 400 when they do not fit the context and the request does not truncate them)."""
        truncating = req is not None and req.truncate_prompt_tokens is not None
        n, ids = await self.pool.encode(text, add_special_tokens, 1 << 62 if truncating else self.max_model_len)
        if ids is None:
            self._context_error(n)
        return ids

    def _truncate(self, req, ids: list[int]) -> list[int]:
        """vLLM's truncate_prompt_tokens: keep the prompt's last k tokens (-1: max_model_len of them)."""
        k = req.truncate_prompt_tokens
        if k is None:
            return ids
        if k > self.max_model_len:
            raise APIError(400, f"truncate_prompt_tokens value ({k}) is greater than max_model_len "
                                f"({self.max_model_len}). Please request a smaller truncation size.",
                           "truncate_prompt_tokens")
        k = self.max_model_len if k == -1 else k
        return ids[-k:] if k else []

    def _context_error(self, prompt_len: int):
        raise context_error(self.max_model_len, prompt_len)

    def _check_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise APIError(400, "The prompt must not be empty.", "prompt")
        vocab = self.vocab_size
        if max(ids) >= vocab:
            raise APIError(400, f"Token id {max(ids)} is out of vocabulary (size {vocab}).", "prompt")
        return ids

    def _params(self, req, prompt_len: int, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
        limit = self.max_model_len
        if prompt_len >= limit:
            self._context_error(prompt_len)
        for name, n in (("logprobs", logprobs), ("prompt_logprobs", req.prompt_logprobs)):
            if n is not None and n > self.max_logprobs:
                raise APIError(400, f"Requested {name} of {n}, which is greater than max allowed: "
                                    f"{self.max_logprobs} (--max-logprobs)", name)
        d = self.defaults
        if max_tokens is None:
            max_tokens = min(limit - prompt_len, d.get("max_tokens", limit))
        elif prompt_len + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
                                f"completion). Please reduce the length of the prompt or completion.", "max_tokens")
        stop_ids = list(req.stop_token_ids or [])
        if any(t < 0 or t >= self.vocab_size for t in stop_ids):
            raise APIError(400, f"stop_token_ids must be in [0, {self.vocab_size}).", "stop_token_ids")
        if req.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens must be less than or equal to max_tokens={max_tokens}, got "
                                f"{req.min_tokens}.", "min_tokens")
        self._check_priority(req.priority)
        return SamplingParams(
            max_tokens=max_tokens, temperature=d.get("temperature", 1.0) if req.temperature is None else req.temperature,
            top_p=d.get("top_p", 1.0) if req.top_p is None else req.top_p,
            top_k=max(0, d.get("top_k", 0) if req.top_k is None else req.top_k),
            min_p=d.get("min_p", 0.0) if req.min_p is None else req.min_p,
            seed=req.seed, stop=list(req.stop or []), stop_token_ids=stop_ids, ignore_eos=req.ignore_eos,
            logprobs=logprobs, skip_special_tokens=req.skip_special_tokens and not self._parses_markers(req),
            include_stop_str_in_output=req.include_stop_str_in_output, prompt_logprobs=req.prompt_logprobs,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=d.get("repetition_penalty", 1.0) if req.repetition_penalty is None
            else req.repetition_penalty,
            logit_bias=self._logit_bias(req.logit_bias), min_tokens=req.min_tokens,
            bad_words_token_ids=self._bad_words(req.bad_words or []),
            allowed_token_ids=self._in_vocab(req.allowed_token_ids, "allowed_token_ids"),
            structured_output=self._structured(req))

    def _in_vocab(self, ids: Optional[list[int]], param: str) -> Optional[list[int]]:
        if ids is not None and any(t >= self.vocab_size for t in ids):
            raise APIError(400, f"{param} contains out-of-vocab token ids (vocabulary size {self.vocab_size}).", param)
        return ids

    def _logit_bias(self, bias: Optional[dict[str, float]]) -> dict[int, float]:
        """Token id -> bias, clamped to [-100, 100] as vLLM does."""
        out = {int(t): min(100.0, max(-100.0, b)) for t, b in (bias or {}).items()}
        bad = sorted(t for t in out if not 0 <= t < self.vocab_size)
        if bad:
            raise APIError(400, f"token_id(s) {bad} in logit_bias contain out-of-vocab token ids.", "logit_bias")
        return out

    def _bad_words(self, words: list[str]) -> list[list[int]]:
        return [self._in_vocab(ids, "bad_words") for ids in bad_words_token_ids(self.tok, words)]

    def _parses_markers(self, req) -> bool:
        """The tool parser reads markers that may be special tokens: they stay in the text (as vLLM's)."""
        return (self.auto_tools and getattr(req, "tool_mode", "none") == "auto"
                and not self.tool_parser.skip_special_tokens)

    def _structured(self, req):
        spec = structured_output(req)
        spec = tool_constraint(req, spec) or spec
        if spec is not None and getattr(getattr(self.client, "cfg", None), "speculative", None) is not None:
            raise APIError(400, "structured output together with --speculative-config is not supported",
                           "structured_outputs" if req.structured_outputs else "response_format")
        return spec

    def _check_priority(self, priority: int) -> None:
        cfg = getattr(self.client, "cfg", None)
        if priority != 0 and getattr(getattr(cfg, "scheduler", None), "policy", "fcfs") != "priority":
            raise APIError(400, f"Got priority {priority} but Priority scheduling is not enabled "
                                "(start the server with --scheduling-policy priority).", "priority")

    @staticmethod
    def _jobs(rid: str, prompts: list[list[int]], n: int, params_for: Callable[[int], SamplingParams],
              kv_transfer_params: Optional[dict] = None, priority: int = 0) -> list[_Job]:
        """n engine requests per prompt, `{rid}-{choice index}`; with a seed, sample j gets seed + j."""
        jobs: list[_Job] = []
        for ids in prompts:
            params = params_for(len(ids))
            for j in range(n):
                p = params if params.seed is None or j == 0 else msgspec.structs.replace(params, seed=params.seed + j)
                jobs.append(_Job(len(jobs), f"{rid}-{len(jobs)}", ids, p, kv_transfer_params, priority))
        return jobs

    # -- running engine requests -----------------------------------------------------------
    async def _tracked(self, job: _Job, arrival: float):
        """One job's output deltas from the engine, counted into the metrics as they come."""
        track, reason, times = self.metrics.track(arrival), "abort", None
        try:
            async with contextlib.aclosing(self.client.generate(job.request_id, job.prompt_ids, job.params,
                                                                job.kv_transfer_params, job.priority)) as outputs:
                async for out in outputs:
                    track.output(len(out.token_ids), out.step_times)
                    reason = out.finish_reason or reason
                    times = out.times or times
                    yield out
        except Exception:
            reason = "error"
            raise
        finally:
            track.finish(reason, len(job.prompt_ids), times)

    async def _merged(self, jobs: list[_Job], arrival: float):
        """Run every job concurrently; yield (choice index, output delta) as they come.

        Closing this generator (the client left) cancels the jobs, which aborts them in the engine.
        An exception from any job ends the whole response with it.
        """
        if len(jobs) == 1:                  # one choice: no task and queue in between
            async with contextlib.aclosing(self._tracked(jobs[0], arrival)) as outputs:
                async for out in outputs:
                    yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(job: _Job):
            try:
                async with contextlib.aclosing(self._tracked(job, arrival)) as outputs:
                    async for out in outputs:
                        queue.put_nowait((job.index, out))
            except Exception as e:
                queue.put_nowait((job.index, e))
            finally:
                queue.put_nowait((job.index, None))

        tasks = [asyncio.create_task(pump(job)) for job in jobs]
        running = len(tasks)
        try:
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, jobs: list[_Job], arrival: float, raw: Request) -> list[_Choice]:
        """Whole outputs, polling for a client disconnect meanwhile (which aborts the jobs)."""
        choices = [_Choice() for _ in jobs]

        async def consume():
            async with contextlib.aclosing(self._merged(jobs, arrival)) as outputs:
                async for i, out in outputs:
                    c = choices[i]
                    c.text += out.text
                    c.num_tokens += len(out.token_ids)
                    c.logprobs += out.logprobs or []
                    c.prompt_logprobs = out.prompt_logprobs or c.prompt_logprobs
                    if out.finish_reason:
                        c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
                        c.kv_transfer_params = out.kv_transfer_params

        task = asyncio.create_task(consume())
        try:
            while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
                if await raw.is_disconnected():
                    raise APIError(499, "The client disconnected.")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        try:
            task.result()
        except APIError:
            raise
        except Exception as e:
            logger.error("request %s failed: %s: %s", jobs[0].request_id.rsplit("-", 1)[0], type(e).__name__, e)
            raise public_error(e) from e
        if any(c.kv_transfer_params for c in choices) and await raw.is_disconnected():
            await self.client.release_kv([j.request_id for j in jobs])    # no decoder will read its blocks
            raise APIError(499, "The client disconnected.")
        return choices

    @staticmethod
    def _sse(chunks: AsyncIterator[Union[BaseModel, bytes]]) -> StreamingResponse:
        """`data: {json}` events (chunks are models or their JSON) and a last `data: [DONE]`; an
        error mid-stream becomes an error event."""
        async def events():
            async with contextlib.aclosing(chunks):
                try:
                    async for chunk in chunks:
                        body = chunk if isinstance(chunk, bytes) else chunk.model_dump_json().encode()
                        yield b"data: " + body + b"\n\n"
                except Exception as e:
                    logger.error("streaming request failed: %s: %s", type(e).__name__, e)
                    err = e if isinstance(e, APIError) else public_error(e)
                    yield f"data: {err.body().model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")


def completion_chunk_json(rid: str, created: int, model: str, index: int, text: str, finish_reason, stop_reason,
                          usage: Optional[UsageInfo]) -> bytes:
    """A streamed completion chunk without logprobs: the bytes CompletionStreamResponse's
    model_dump_json gives, encoded by msgspec without building the pydantic models per token."""
    body = {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason,
                         "stop_reason": stop_reason}]}
    if usage is not None:
        body["usage"] = usage.model_dump()
    return _encode(body)


def public_error(e: Exception) -> APIError:
    """What a client is told of an internal failure: its kind, never its text (which is logged)."""
    if isinstance(e, EngineError):
        return APIError(503, "The engine is not available; the server is shutting down to be restarted.")
    return APIError(500, "Internal server error.")


def _with_id(response: Response, base: str) -> Response:
    """X-Request-Id echoed back (the client's, or the one this server made)."""
    response.headers["X-Request-Id"] = base
    return response


def _json(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


def _message(m) -> dict:
    """A request message as the chat template takes it: text parts joined into one string."""
    d = {k: v for k, v in m.model_dump().items() if v is not None or k == "content"}
    if isinstance(m.content, list):
        texts = []
        for part in m.content:
            if part.get("type") != "text":
                raise APIError(400, f"Message content of type {part.get('type')!r} is not supported.", "messages")
            texts.append(part.get("text", ""))
        d["content"] = "\n".join(texts)
    return d
