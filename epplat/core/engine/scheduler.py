"""Continuous batching with chunked prefill and preemption by recomputation.

Each step has a token budget (``max_num_batched_tokens``). Running requests come
first, in arrival order: a decode takes one token, an unfinished prefill the next
chunk that fits. When the KV cache cannot grow, the most recently admitted running
request is preempted (its blocks freed, to be recomputed later). Waiting requests
are admitted while budget, ``max_num_seqs`` and free blocks allow, each starting after the
longest prefix of it found in the prefix cache.
"""

from __future__ import annotations

from collections import deque

from epplat.config import SchedulerConfig
from epplat.core.engine.block_manager import BlockManager
from epplat.core.engine.request import Request, Status


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager, lookahead: int = 0):
        self.cfg, self.blocks = cfg, blocks
        self.lookahead = lookahead    # KV slots a running request gets beyond its step (speculative drafting)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        req.finish_reason = "abort"
        self.finish(req)
        return req

    def finish(self, req: Request) -> None:
        req.status = Status.FINISHED
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.release(req)
        self.requests.pop(req.request_id, None)

    def _preempt(self, req: Request) -> None:
        self.blocks.release(req)
        req.num_computed = 0
        req.spec_token_ids = []
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def schedule(self) -> list[tuple[Request, int]]:
        budget = self.cfg.max_num_batched_tokens
        out: list[tuple[Request, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens + len(req.spec_token_ids) - req.num_computed, budget)
            while not self.blocks.allocate(req, n + self.lookahead):
                victim = self.running.pop()
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
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            hit = self.blocks.cached_prefix(req)
            remaining = req.num_tokens - len(hit) * self.blocks.block_size
            n = min(remaining, budget)
            if n < remaining and not self.cfg.enable_chunked_prefill:
                break
            if not self.blocks.admit(req, hit, n):
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            out.append((req, n))
            budget -= n
        return out
