"""Continuous batching with chunked prefill and preemption by recomputation.

Each step has a token budget (``max_num_batched_tokens``). Running requests come
first, in arrival order: a decode takes one token, an unfinished prefill the next
chunk that fits. When the KV cache cannot grow, the most recently admitted running
request is preempted (its blocks freed, to be recomputed later). Waiting requests
are admitted while budget, ``max_num_seqs`` and free blocks allow, each starting after the
longest prefix of it found in the prefix cache. With the priority policy (vLLM's), the waiting
queue is kept in (priority, arrival) order and so are the running requests at each step, so that
the victim of a preemption is the running request last in that order.

Requests in a step still in flight (pipeline parallelism keeps several) are neither scheduled nor
preempted until it completes; ``max_seqs`` splits the requests over the steps in flight, so that
each pipeline stage has one to work on. With async scheduling a request is scheduled again while its
step runs: its token sampled there is pending (``num_pending``: on the device, not yet here), the
next step's input at that position; a request whose pending tokens reach max_tokens or the model
length waits for them instead.

With a KV connector, a new request may also find prompt tokens elsewhere: loaded before this
step's forward (synchronously), or asynchronously, the request then waiting outside the batch
(in ``remote``) until the workers report its blocks received. A finished request whose blocks
the connector holds (for another engine to read) waits in ``held`` until they are sent.
"""

from __future__ import annotations

import bisect
from collections import deque

from epplat.config import SchedulerConfig
from epplat.core.engine.block_manager import BlockManager
from epplat.core.engine.request import Request, Status


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager, lookahead: int = 0, connector=None,
                 max_model_len: int = 1 << 62):
        self.cfg, self.blocks, self.connector = cfg, blocks, connector
        self.max_model_len = max_model_len
        self.lookahead = lookahead    # KV slots a running request gets beyond its step (speculative drafting)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.remote: dict[str, Request] = {}     # waiting for their KV from elsewhere (blocks allocated)
        self.held: dict[str, Request] = {}       # finished; blocks held by the connector until sent
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self._wait(req, front=False)

    def _wait(self, req: Request, front: bool) -> None:
        """Into the waiting queue: at its (priority, arrival) place under the priority policy, else at
        the back (new) or the front (preempted, or back from a KV load)."""
        if self.cfg.policy == "priority":
            keys = [(r.priority, r.arrival) for r in self.waiting]
            self.waiting.insert(bisect.bisect_right(keys, (req.priority, req.arrival)), req)
        elif front:
            self.waiting.appendleft(req)
        else:
            self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_pending(self) -> bool:
        return bool(self.remote or self.held)

    def kv_finished(self, sent: set[str], received: set[str], failed: set[str] = frozenset()) -> None:
        """The workers' report: held blocks sent (free them), remote loads done (the request can run), loads
        failed (the request computes those tokens itself)."""
        for rid in sent:
            req = self.held.pop(rid, None)
            if req is not None:
                self.blocks.release(req)
        for rid in (*received, *failed):
            req = self.remote.pop(rid, None)
            if req is None:
                continue
            if req.status is Status.FINISHED:       # aborted while its blocks were being written
                self.blocks.release(req)
                continue
            if rid in failed:
                req.num_external_tokens = 0
            req.num_computed += req.num_external_tokens
            self.blocks.cache_full_blocks(req)
            req.status = Status.WAITING
            self._wait(req, front=True)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            if request_id in self.held:          # finished, its blocks held for a reader that will not come
                self.connector.release(request_id)
            return None
        req.finish_reason = "abort"
        self.finish(req)
        return req

    def finish(self, req: Request) -> None:
        req.status = Status.FINISHED
        self.requests.pop(req.request_id, None)
        if req.request_id in self.remote:            # freed when the load in flight ends
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if self.connector is not None:
            hold, req.kv_transfer_out = self.connector.request_finished(req)
            if hold:
                self.held[req.request_id] = req
                return
        self.blocks.release(req)

    def _preempt(self, req: Request) -> None:
        self.blocks.release(req)
        req.num_computed = 0
        req.spec_token_ids = []
        req.status = Status.WAITING
        self._wait(req, front=True)
        self.num_preemptions += 1

    def schedule(self, max_seqs: int | None = None) -> list[tuple[Request, int]]:
        """This step's (request, new tokens), at most ``max_seqs`` requests."""
        budget = self.cfg.max_num_batched_tokens
        max_seqs = max_seqs or self.cfg.max_num_seqs
        if self.cfg.policy == "priority":
            self.running.sort(key=lambda r: (r.priority, r.arrival))
        out: list[tuple[Request, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0 and len(out) < max_seqs:
            req = self.running[i]
            if req.in_flight or req.done_after_pending(self.max_model_len):
                i += 1
                continue
            n = min(req.num_known + len(req.spec_token_ids) - req.num_computed, budget)
            while not self.blocks.allocate(req, n + self.lookahead):
                victim = next(r for r in reversed(self.running) if not r.in_flight)   # req at the latest
                self.running.remove(victim)
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                out.append((req, n))
                budget -= n
                i += 1
                continue
            break
        while (self.waiting and budget > 0 and not preempted and len(self.running) < self.cfg.max_num_seqs
               and len(out) < max_seqs):
            req = self.waiting[0]
            if req.block_table:                      # its KV arrived from elsewhere
                n = min(req.num_tokens - req.num_computed, budget)
                if not self.blocks.allocate(req, n):
                    break
                self.waiting.popleft()
                req.status = Status.RUNNING
                self.running.append(req)
                out.append((req, n))
                budget -= n
                continue
            # prompt logprobs need every prompt position computed here (as vLLM, no prefix-cache hit)
            hit = self.blocks.cached_prefix(req) if req.params.prompt_logprobs is None else []
            local = len(hit) * self.blocks.block_size
            ext, load_async = 0, False
            if self.connector is not None:
                ext, load_async = self.connector.get_num_new_matched_tokens(req, local)
                ext = max(0, min(ext, req.num_tokens - 1 - local))   # the last token is computed here
            if ext and load_async:
                if not self.blocks.admit(req, hit, ext):
                    break
                self.waiting.popleft()
                self.connector.update_state_after_alloc(req, ext)
                req.num_external_tokens = ext
                self.remote[req.request_id] = req
                continue
            remaining = req.num_tokens - local - ext
            n = min(remaining, budget)
            if n < remaining and not self.cfg.enable_chunked_prefill:
                break
            if not self.blocks.admit(req, hit, ext + n):
                break
            if ext:
                self.connector.update_state_after_alloc(req, ext)
                req.num_computed += ext
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            out.append((req, n))
            budget -= n
        return out
