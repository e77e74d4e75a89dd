"""The engine client (frontend side): starts engine cores, sends requests, streams outputs.

It runs in the API server's event loop. Each request gets a queue; a reader task
routes engine outputs to those queues, detokenizes them and applies stop strings.
Closing a request's output iterator early aborts it in the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Optional

import msgspec
import zmq
import zmq.asyncio

from epplat.config import ConfigError, EngineConfig
from epplat.core.engine import protocol as P
from epplat.core.engine.core_proc import run_engine_core
from epplat.core.engine.detokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


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


class _RequestState:
    def __init__(self, request_id: str, params: P.SamplingParams, tokenizer, num_prompt: int):
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.detok = IncrementalDetokenizer(tokenizer, params.stop, params.skip_special_tokens,
                                            params.include_stop_str_in_output)
        self.num_prompt = num_prompt
        self.num_output = 0
        self.engine_done = False

    def process(self, out: P.EngineOutput) -> CompletionOutput:
        self.num_output += len(out.new_token_ids)
        finish, reason = out.finish_reason, out.stop_reason
        self.engine_done = finish is not None
        matched = self.detok.add(out.new_token_ids, final=finish is not None)
        if matched is not None:
            finish, reason = "stop", matched
        return CompletionOutput(self.request_id, self.detok.delta(final=finish is not None),
                                list(out.new_token_ids), out.logprobs, finish, reason,
                                self.num_prompt, self.num_output)


class EngineClient:
    """Talks to one engine core process (the DP coordinator spreads over several)."""

    def __init__(self, cfg: EngineConfig, tokenizer, eos_token_ids: list[int]):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        run_dir = tempfile.mkdtemp(prefix="epplat-")
        self.input_addr = f"ipc://{run_dir}/input"
        self.output_addr = f"ipc://{run_dir}/output"
        self.procs: list[multiprocessing.Process] = []
        self.max_model_len = 0
        self.vocab_size = 0
        self.states: dict[str, _RequestState] = {}
        self.calls: dict[int, asyncio.Future] = {}
        self.call_ids = itertools.count(1)
        self.dead_reason: Optional[str] = None
        self._started = False
        self._last_stats = P.EngineStats()

    # -- startup -------------------------------------------------------------------------
    def launch(self, timeout: float = 600.0) -> None:
        """Start the engine core process and wait until its model and KV cache are ready."""
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=run_engine_core, name="EngineCore_0", daemon=True,
                           args=(self.cfg.to_json(), 0, self.input_addr, self.output_addr, child_conn))
        proc.start()
        self.procs.append(proc)
        deadline = time.time() + timeout
        while not parent_conn.poll(0.2):
            if not proc.is_alive():
                raise EngineError(f"engine core exited with code {proc.exitcode} during startup")
            if time.time() > deadline:
                proc.kill()
                raise EngineError("engine core did not start in time")
        info = msgspec.json.decode(parent_conn.recv_bytes())
        if "error" in info:
            proc.join(5)
            raise ConfigError(info["error"])
        self.max_model_len = info["max_model_len"]
        self.vocab_size = info["vocab_size"]

    async def start(self) -> None:
        """Open the sockets in the running event loop and start the output reader."""
        if self._started:
            return
        self._started = True
        self.zctx = zmq.asyncio.Context()
        self.input = self.zctx.socket(zmq.PUSH)
        self.input.bind(self.input_addr)
        self.output = self.zctx.socket(zmq.PULL)
        self.output.bind(self.output_addr)
        self._reader = asyncio.get_running_loop().create_task(self._read_outputs())

    def shutdown(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        if self._started:
            self._reader.cancel()
            self.input.close(linger=0)
            self.output.close(linger=0)

    # -- health --------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        if self.dead_reason is None and not all(p.is_alive() for p in self.procs):
            self._mark_dead("engine core process exited")
        return self.dead_reason is None

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is None:
            logger.error("engine is dead: %s", reason)
        self.dead_reason = reason
        err = EngineError(f"engine died: {reason}")
        for st in self.states.values():
            st.queue.put_nowait(err)
        for fut in self.calls.values():
            if not fut.done():
                fut.set_exception(err)

    async def _read_outputs(self) -> None:
        while True:
            if await self.output.poll(1000) == 0:
                self.healthy  # noqa: B018  (detects a dead engine process)
                continue
            msg = P.message_decoder.decode(await self.output.recv())
            if isinstance(msg, P.EngineOutputs):
                if msg.stats is not None:
                    self._last_stats = msg.stats
                for out in msg.outputs:
                    st = self.states.get(out.request_id)
                    if st is not None:
                        st.queue.put_nowait(out)
            elif isinstance(msg, P.UtilityResult):
                fut = self.calls.pop(msg.call_id, None)
                if fut and not fut.done():
                    if msg.error:
                        fut.set_exception(EngineError(msg.error))
                    else:
                        fut.set_result(msg.result)
            elif isinstance(msg, P.EngineDead):
                self._mark_dead(msg.reason)

    # -- requests ------------------------------------------------------------------------
    async def _send(self, msg) -> None:
        await self.start()
        if not self.healthy:
            raise EngineError(f"engine died: {self.dead_reason}")
        await self.input.send(P.encoder.encode(msg))

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: P.SamplingParams) -> AsyncIterator[CompletionOutput]:
        if request_id in self.states:
            raise ValueError(f"request id {request_id!r} is already running")
        st = _RequestState(request_id, params, self.tokenizer, len(prompt_token_ids))
        self.states[request_id] = st
        finished = False
        try:
            await self._send(P.EngineRequest(request_id, list(prompt_token_ids), params,
                                             self.eos_token_ids, time.time()))
            while True:
                item = await st.queue.get()
                if isinstance(item, Exception):
                    raise item
                out = st.process(item)
                if out.finish_reason is not None:
                    finished = True
                    yield out
                    return
                if out.text or out.token_ids:
                    yield out
        finally:
            self.states.pop(request_id, None)
            if not (finished and st.engine_done) and self.dead_reason is None and self._started:
                try:
                    self.input.send(P.encoder.encode(P.AbortRequests([request_id])))
                except zmq.ZMQError:
                    pass

    async def abort(self, request_id: str) -> None:
        if self._started and self.dead_reason is None:
            await self.input.send(P.encoder.encode(P.AbortRequests([request_id])))

    async def call(self, method: str, *args, timeout: float = 30.0):
        call_id = next(self.call_ids)
        fut = asyncio.get_running_loop().create_future()
        self.calls[call_id] = fut
        await self._send(P.UtilityCall(call_id, method, list(args)))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.calls.pop(call_id, None)

    async def get_stats(self) -> P.EngineStats:
        try:
            return msgspec.convert(await self.call("stats"), P.EngineStats)
        except (EngineError, asyncio.TimeoutError):
            return self._last_stats


def new_request_id(prefix: str = "cmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


