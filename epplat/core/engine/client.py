"""The engine client (frontend side): starts engine cores, sends requests, streams outputs.

It runs in the API server's event loop. A reader task takes the engine outputs that have
arrived, in batches; a detokenizer thread turns each batch into text deltas (and applies
stop strings) while the loop goes on serving; each request then finds what came for it
merged into one output since it last looked (as vLLM's output collector does), so a
consumer that falls behind catches up in one step instead of holding the loop token by
token. Closing a request's output iterator early aborts it in the engine.

An engine is dead when its process exits, when it says so, or when it has sent nothing
(not even a heartbeat) for ``engine_iteration_timeout_s``; then every in-flight request
ends with EngineError and the ``on_dead`` callbacks run (the API server exits on it).
Frames that are not authentic or do not decode are dropped and logged.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

import msgspec
import zmq
import zmq.asyncio

from epplat.config import EngineConfig
from epplat.core.engine import protocol as P
from epplat.core.engine.detokenizer import IncrementalDetokenizer
from epplat.core.engine.frame_auth import BadFrame, FrameAuth, listen

logger = logging.getLogger(__name__)

MAX_BATCH_FRAMES = 256    # engine output frames the reader takes before handing them to the detokenizer


class EngineError(RuntimeError):
    """The engine failed while serving a request."""


@dataclass
class CompletionOutput:
    request_id: str
    text: str
    token_ids: list[int]
    logprobs: Optional[list[list[P.TokenLogprob]]]
    finish_reason: Optional[str]
    stop_reason: object
    num_prompt_tokens: int
    num_output_tokens: int
    kv_transfer_params: Optional[dict] = None
    times: Optional[P.RequestTimes] = None     # the engine's queue / prefill / decode times, when finished
    step_times: list[float] = field(default_factory=list)   # when each engine step's tokens arrived (monotonic)
    prompt_logprobs: Optional[list[list[P.TokenLogprob]]] = None   # on the first output, when asked

    def merged(self, later: "CompletionOutput") -> "CompletionOutput":
        """This delta followed by a later one, as one."""
        lps = None if self.logprobs is None and later.logprobs is None else (self.logprobs or []) + (later.logprobs or [])
        return CompletionOutput(later.request_id, self.text + later.text, self.token_ids + later.token_ids, lps,
                                later.finish_reason, later.stop_reason, later.num_prompt_tokens,
                                later.num_output_tokens, later.kv_transfer_params or self.kv_transfer_params,
                                later.times or self.times, self.step_times + later.step_times,
                                self.prompt_logprobs or later.prompt_logprobs)


class _RequestState:
    def __init__(self, request_id: str, params: P.SamplingParams, tokenizer, num_prompt: int):
        self.request_id = request_id
        self.detok = IncrementalDetokenizer(tokenizer, params.stop, params.skip_special_tokens,
                                            params.include_stop_str_in_output)
        self.num_prompt = num_prompt
        self.min_tokens = params.min_tokens
        self.num_output = 0
        self.engine_done = False
        self.finished = False                     # a finish (the engine's or a stop string) was processed
        self.pending: Optional[CompletionOutput] = None
        self.error: Optional[Exception] = None
        self.ready = asyncio.Event()

    def process(self, out: P.EngineOutput, arrived: float) -> Optional[CompletionOutput]:
        """One engine output as a text delta (in the detokenizer thread); None after the finish."""
        if self.finished:
            return None
        self.num_output += len(out.new_token_ids)
        finish, reason = out.finish_reason, out.stop_reason
        self.engine_done = finish is not None
        # vLLM's min_tokens: no stop string ends the output before it has min_tokens tokens
        matched = self.detok.add(out.new_token_ids, final=finish is not None,
                                 check_stop=self.num_output > self.min_tokens)
        if matched is not None:
            finish, reason = "stop", matched
        self.finished = finish is not None
        return CompletionOutput(self.request_id, self.detok.delta(final=finish is not None),
                                list(out.new_token_ids), out.logprobs, finish, reason,
                                self.num_prompt, self.num_output, out.kv_transfer_params, out.times,
                                [arrived] if out.new_token_ids else [], out.prompt_logprobs)

    def put(self, out: CompletionOutput) -> None:
        self.pending = out if self.pending is None else self.pending.merged(out)
        self.ready.set()

    def fail(self, err: Exception) -> None:
        self.error = err
        self.ready.set()

    async def get(self) -> CompletionOutput:
        """Everything that came since the last call, merged; the request's error after that."""
        await self.ready.wait()
        out, self.pending = self.pending, None
        if out is not None:
            if self.error is None:
                self.ready.clear()
            return out
        raise self.error


def _process(batch: list, arrived: float) -> list:
    """[(state, engine output)] -> [(state, delta or exception)]: the detokenizer thread's work."""
    done = []
    for st, out in batch:
        try:
            done.append((st, st.process(out, arrived)))
        except Exception as e:
            logger.error("request %s: detokenization failed: %s: %s", st.request_id, type(e).__name__, e)
            done.append((st, e))
    return done


class EngineClient:
    """One API server's view of the engines: a ROUTER to send them requests (by DP rank) and
    a PULL for their outputs. Requests go to the least-loaded engine."""

    def __init__(self, cfg: EngineConfig, tokenizer, eos_token_ids: list[int], client_index: int = 0,
                 engine_ranks: Optional[list[int]] = None, endpoints: Optional[tuple[str, str]] = None,
                 procs: Optional[list] = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.client_index = client_index
        self.engine_ranks = engine_ranks if engine_ranks is not None else [0]
        self.router_addr, self.output_addr = endpoints or cfg.parallel.api_endpoints(client_index)
        self.procs = procs or []          # engine processes this process launched (health checks)
        self.max_model_len = 0
        self.vocab_size = 0
        self.num_blocks = 0
        self.states: dict[str, _RequestState] = {}
        self.engine_of: dict[str, int] = {}
        self.load: dict[int, int] = {r: 0 for r in self.engine_ranks}
        self.engine_stats: dict[int, P.EngineStats] = {}
        self.calls: dict[int, asyncio.Future] = {}
        self.call_ids = itertools.count(1)
        self.dead_reason: Optional[str] = None
        self.on_dead: list = []           # callbacks, run once when the engines are found dead
        self.auth = FrameAuth(cfg.parallel.internal_secret)
        self.last_heard: dict[int, float] = {}
        self._last_check = 0.0
        self._started = False
        self._ready: set[int] = set()
        self._detokenizer = ThreadPoolExecutor(1, thread_name_prefix="epplat-detokenizer")

    # -- startup -------------------------------------------------------------------------
    async def start(self, timeout: float = 600.0) -> None:
        """Bind the sockets in the running event loop and wait until every engine said ready."""
        if self._started:
            return
        self._started = True
        self.zctx = zmq.asyncio.Context()
        self.router = self.zctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        listen(self.router, self.router_addr)
        self.output = self.zctx.socket(zmq.PULL)
        listen(self.output, self.output_addr)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_outputs()), loop.create_task(self._read_router())]
        deadline = time.time() + timeout
        while self._ready != set(self.engine_ranks):
            if not self.healthy:
                raise EngineError(f"engine died during startup: {self.dead_reason}")
            if time.time() > deadline:
                raise EngineError(f"engines {sorted(set(self.engine_ranks) - self._ready)} did not connect")
            await asyncio.sleep(0.05)
        logger.info("API server %d connected to %d engine(s)", self.client_index, len(self.engine_ranks))

    def shutdown(self) -> None:
        if self._started:
            for t in self._tasks:
                t.cancel()
            self.router.close(linger=0)
            self.output.close(linger=0)
        self._detokenizer.shutdown(wait=False, cancel_futures=True)

    # -- health --------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        if self.dead_reason is None and not all(p.is_alive() for p in self.procs):
            self._mark_dead("an engine process exited")
        return self.dead_reason is None

    def _mark_dead(self, reason: str) -> None:
        first = self.dead_reason is None
        if first:
            logger.error("engine is dead: %s", reason)
        self.dead_reason = reason
        err = EngineError(f"engine died: {reason}")
        if first:
            for cb in self.on_dead:
                cb()
        for st in self.states.values():
            st.fail(err)
        for fut in self.calls.values():
            if not fut.done():
                fut.set_exception(err)

    def _decode(self, frame, where: str):
        try:
            return self.auth.decode(P.message_decoder, frame)
        except BadFrame as e:
            self.auth.dropped(where, e, frame)
            return None

    async def _read_router(self) -> None:
        while True:
            frames = await self.router.recv_multipart(copy=False)
            msg = self._decode(frames[-1], "the API server's request socket")
            if isinstance(msg, P.EngineReady) and msg.engine_index in self.load:
                self.max_model_len, self.vocab_size = msg.max_model_len, msg.vocab_size
                self.num_blocks = msg.num_blocks       # a rank added by a scale gets the same KV cache size
                self.last_heard[msg.engine_index] = time.monotonic()
                self._ready.add(msg.engine_index)

    def _check_heartbeats(self) -> None:
        """Called with nothing left to read: an engine unheard of for too long is dead."""
        limit = self.cfg.parallel.engine_iteration_timeout_s
        now = time.monotonic()
        for r, t in self.last_heard.items():
            if now - t > limit:
                self._mark_dead(f"DP rank {r} sent nothing (not even a heartbeat) for {limit:g} s")

    async def _read_outputs(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if await self.output.poll(1000) == 0:
                if self.healthy:    # notices a dead engine process
                    self._check_heartbeats()
                continue
            frames = [await self.output.recv(copy=False)]
            while len(frames) < MAX_BATCH_FRAMES and self.output.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                frames.append(await self.output.recv(copy=False))     # there: returns at once
            now, batch = time.monotonic(), []
            for frame in frames:
                self._handle(self._decode(frame, "the API server's output socket"), now, batch)
            if now - self._last_check > 1.0 and not self.output.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._last_check = now      # busy, but nothing queued: a silent engine is silent
                self._check_heartbeats()
            if batch:
                for st, out in await loop.run_in_executor(self._detokenizer, _process, batch, now):
                    if isinstance(out, Exception):
                        st.fail(out)
                    elif out is not None:
                        st.put(out)

    def _handle(self, msg, now: float, batch: list) -> None:
        """One message from an engine; request outputs go into `batch` for the detokenizer."""
        index = getattr(msg, "engine_index", None)
        if index in self.last_heard:
            self.last_heard[index] = now
        if isinstance(msg, P.EngineOutputs):
            if msg.stats is not None:
                self.engine_stats[msg.engine_index] = msg.stats
            for out in msg.outputs:
                st = self.states.get(out.request_id)
                if st is not None:
                    batch.append((st, out))
        elif isinstance(msg, P.UtilityResult):
            fut = self.calls.get(msg.call_id)
            if fut and not fut.done():
                if msg.error:
                    fut.set_exception(EngineError(msg.error))
                else:
                    fut.set_result(msg.result)
        elif isinstance(msg, P.EngineDead):
            self._mark_dead(f"DP rank {msg.engine_index}: {msg.reason}")

    # -- requests ------------------------------------------------------------------------
    def _pick_engine(self) -> int:
        """Least loaded: this server's in-flight requests plus what others queued (from engine stats)."""
        def score(r):
            st = self.engine_stats.get(r)
            others = max(0, (st.num_running + st.num_waiting) - self.load[r]) if st else 0
            return (self.load[r] + others, r)
        return min(self.engine_ranks, key=score)

    async def _send(self, engine: int, msg) -> None:
        await self.start()
        if not self.healthy:
            raise EngineError(f"engine died: {self.dead_reason}")
        try:
            await self.router.send_multipart([f"engine-{engine}".encode(), self.auth.seal(P.encoder.encode(msg))])
        except zmq.ZMQError as e:
            raise EngineError(f"engine {engine} unreachable: {e}") from None

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: P.SamplingParams,
                       kv_transfer_params: Optional[dict] = None, priority: int = 0) -> AsyncIterator[CompletionOutput]:
        if request_id in self.states:
            raise ValueError(f"request id {request_id!r} is already running")
        st = _RequestState(request_id, params, self.tokenizer, len(prompt_token_ids))
        engine = self._pick_engine()
        self.states[request_id] = st
        self.engine_of[request_id] = engine
        self.load[engine] += 1
        finished = False
        try:
            await self._send(engine, P.EngineRequest(request_id, list(prompt_token_ids), params,
                                                     self.eos_token_ids, time.time(), self.client_index,
                                                     kv_transfer_params, priority))
            while True:
                out = await st.get()
                if out.finish_reason is not None:
                    finished = True
                    yield out
                    return
                if out.text or out.token_ids:
                    yield out
        finally:
            self.states.pop(request_id, None)
            engine = self.engine_of.pop(request_id, engine)      # (elastic EP may have moved it: move_request)
            self.load[engine] -= 1
            if not (finished and st.engine_done) and self.dead_reason is None and self._started:
                try:
                    self.router.send_multipart([f"engine-{engine}".encode(),
                                                self.auth.seal(P.encoder.encode(P.AbortRequests([request_id])))])
                except zmq.ZMQError:
                    pass

    async def move_request(self, er: P.EngineRequest, old: int) -> bool:
        """Elastic EP: a request handed off by departing rank ``old`` (``er.resume`` holds its output so far)
        goes on on the least-loaded routed rank; its stream carries on. False when it ended meanwhile."""
        if er.request_id not in self.states:
            return False
        new = self._pick_engine()
        self.engine_of[er.request_id] = new
        self.load[old] -= 1
        self.load[new] += 1
        await self._send(new, er)
        return True

    async def release_kv(self, request_ids: list[str]) -> None:
        """Finished requests whose blocks an engine holds for another engine to read (a prefill whose client
        left): every engine frees those it holds that no reader has started on."""
        for engine in self.engine_ranks:
            if self.dead_reason is None:
                await self._send(engine, P.AbortRequests(list(request_ids)))

    async def abort(self, request_id: str) -> None:
        engine = self.engine_of.get(request_id)
        if engine is not None and self.dead_reason is None:
            await self._send(engine, P.AbortRequests([request_id]))

    async def call(self, engine: int, method: str, *args, timeout: float = 30.0):
        call_id = next(self.call_ids)
        fut = asyncio.get_running_loop().create_future()
        self.calls[call_id] = fut
        await self._send(engine, P.UtilityCall(call_id, method, list(args), self.client_index))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.calls.pop(call_id, None)

    async def engine_loads(self) -> dict[int, P.EngineStats]:
        """Each reachable engine's stats (the last ones seen when an engine does not answer)."""
        try:
            parts = await asyncio.gather(*(self.call(r, "stats", timeout=5.0) for r in self.engine_ranks))
            return {r: msgspec.convert(p, P.EngineStats) for r, p in zip(self.engine_ranks, parts)}
        except (EngineError, asyncio.TimeoutError) as e:
            logger.warning("engine stats: an engine did not answer (%s); /metrics shows the stats its last "
                           "outputs carried", type(e).__name__)
            return dict(self.engine_stats)

    async def get_stats(self) -> P.EngineStats:
        return sum_stats(await self.engine_loads())


SPEC_FIELDS = ("spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens")


def sum_stats(per_engine: dict) -> P.EngineStats:
    """Counts summed over engines, KV usage averaged."""
    total = P.EngineStats()
    for s in per_engine.values():
        for f in ("num_running", "num_waiting", "num_preemptions", "num_free_blocks", "num_total_blocks",
                  "num_requests_received", "prefix_cache_queries", "prefix_cache_hits",
                  "num_prompt_tokens_computed", *SPEC_FIELDS):
            setattr(total, f, getattr(total, f) + getattr(s, f))
    if per_engine:
        total.kv_usage = sum(s.kv_usage for s in per_engine.values()) / len(per_engine)
    return total


def new_request_id(prefix: str = "cmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


