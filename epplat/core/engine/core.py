"""The engine core: scheduler + KV blocks + model runner, stepped in a loop.

A step is three calls: ``schedule`` (the batch), ``launch`` (its inputs laid out, copied and the
forward and sampling queued on the device) and ``complete`` (its tokens read on the host, the
requests advanced, their outputs). ``launch`` advances each request as if its step had run (its
computed tokens, one pending token where it samples), so the scheduler can plan the next step before
this one completes. With ``--async-scheduling`` it does: ``run`` launches step N+1 and only then
completes step N, whose tokens step N+1 takes on the device; the host's work of both (step N+1's
scheduling and inputs, step N's outputs) overlaps the device's step. A request that ends at step N
has had step N+1 launched with it: that step's token for it is dropped, never sent. Requests whose
logits rules or grammar read their own output tokens wait for step N before step N+1 is scheduled.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Optional

import msgspec
import torch
import torch.distributed as dist

from epplat.config import ConfigError, EngineConfig
from epplat.connectors.base import KVConnectorRole
from epplat.connectors.loader import make_connector
from epplat.core.distributed.parallel_state import ParallelState
from epplat.core.engine.block_manager import BlockManager
from epplat.core.engine.model_runner import KVLoad, ModelRunner
from epplat.core.engine.protocol import EngineOutput, EngineRequest, EngineStats
from epplat.core.engine.request import Request, Status
from epplat.core.engine.scheduler import Scheduler
from epplat.core.engine.spec_decode import MtpDrafter, accepted_count
from epplat.core.engine.structured_output import Grammars
from epplat.core.engine.stat_log import StatLog

logger = logging.getLogger(__name__)


def init_kv_cache(runner: ModelRunner, cfg: EngineConfig, ps: ParallelState) -> tuple[int, int]:
    """Size (agreed over the DP rank's processes: every TP rank and pipeline stage) and allocate the KV cache; returns (num_blocks, max_model_len)."""
    hf_max = runner.model_cfg.max_position
    max_model_len = cfg.model.max_model_len or hf_max
    if max_model_len > hf_max:
        raise ConfigError(f"--max-model-len {max_model_len} is larger than the model's "
                          f"max_position_embeddings ({hf_max})")
    num_blocks = runner.num_blocks_from_memory(max_model_len)
    if ps.engine_cpu_group is not None:     # (elastic EP's new ranks have none before they join: their count is given)
        t = torch.tensor([num_blocks])
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=ps.engine_cpu_group)
        num_blocks = int(t)
    tokens = num_blocks * cfg.cache.block_size
    if tokens < max_model_len:
        raise ConfigError(f"the KV cache holds {tokens} tokens, fewer than --max-model-len "
                          f"{max_model_len}; lower --max-model-len or give the KV cache more memory")
    runner.allocate_kv_cache(num_blocks)
    runner.attach_kv_connector()
    runner.capture_graphs(max_model_len)
    runner.warm_up(max_model_len)
    if ps.is_driver:
        prefix = runner.platform.log_prefix()
        dp = f"[DP rank {ps.dp_rank}] " if ps.dp_size > 1 else ""
        logger.info("%s%s KV cache size: %s tokens", dp, prefix, f"{tokens:,}")
        logger.info("%sMaximum concurrency for %s tokens per request: %.2fx", dp, f"{max_model_len:,}",
                    tokens / max_model_len)
    return num_blocks, max_model_len


class EngineCore:
    def __init__(self, cfg: EngineConfig, platform, device, ps: ParallelState | None = None,
                 runner: ModelRunner | None = None):
        self.cfg = cfg
        self.ps = ps or ParallelState()
        self.runner = runner or ModelRunner(cfg, platform, device, self.ps)
        self.num_blocks, self.max_model_len = init_kv_cache(self.runner, cfg, self.ps)
        self.blocks = BlockManager(self.num_blocks, cfg.cache.block_size, cfg.cache.enable_prefix_caching)
        spec = cfg.speculative
        self.kv_connector = make_connector(cfg, KVConnectorRole.SCHEDULER, self.ps.dp_rank)
        self.tp_publish = None                      # the driver's send to its TP workers (set by the driver)
        self._no_kv_meta = msgspec.msgpack.encode(self.kv_connector.metadata_type()) if self.kv_connector else None
        self.scheduler = Scheduler(cfg.scheduler, self.blocks, lookahead=spec.num_speculative_tokens if spec else 0,
                                   connector=self.kv_connector, max_model_len=self.max_model_len)
        self.overlap = cfg.scheduler.async_scheduling
        self.in_flight = None                       # async scheduling: the step launched last, not yet completed
        if spec is not None:
            self.runner.drafter = MtpDrafter(self.runner, spec.num_speculative_tokens, self.max_model_len)
        self.client_of: dict[str, int] = {}
        self.num_received = 0
        self.stat_log = StatLog(self.ps.dp_rank)
        self.num_prompt_tokens_computed = 0
        self.grammars = Grammars(cfg.model.tokenizer or cfg.model.model, self.runner.model_cfg.vocab_size)
        self.compiling: dict[str, tuple[Request, Future]] = {}   # requests whose grammar is being compiled

    def add_request(self, er: EngineRequest) -> list[EngineOutput]:
        """Queue a request (one with a grammar once it has compiled: ``poll_grammars``)."""
        self.num_received += 1
        self.client_of[er.request_id] = er.client_index
        req = Request(er)
        spec = er.params.structured_output
        if spec is not None:
            self.compiling[er.request_id] = (req, self.grammars.submit(spec, sorted(req.eos_token_ids)))
            return []
        self.scheduler.add(req)
        return []

    def poll_grammars(self) -> list[EngineOutput]:
        """Between steps: requests whose grammar has compiled join the scheduler; one whose grammar did
        not compile ends (abort), never the engine (the API server checked that it parses)."""
        out = []
        for rid, (req, compiled) in list(self.compiling.items()):
            if not compiled.done():
                continue
            del self.compiling[rid]
            try:
                req.grammar = compiled.result()
            except Exception as e:
                logger.error("request %s: its %s constraint did not compile: %s", rid,
                             req.params.structured_output.kind, e)
                out.append(EngineOutput(rid, [], finish_reason="abort", num_prompt_tokens=req.prompt_len))
                continue
            self.scheduler.add(req)
        return out

    def abort(self, request_ids: list[str]) -> list[EngineOutput]:
        out = []
        for rid in request_ids:
            req = self.scheduler.abort(rid) or self.compiling.pop(rid, (None,))[0]
            if req is not None:
                out.append(EngineOutput(rid, [], finish_reason="abort", num_prompt_tokens=req.prompt_len,
                                        times=req.times()))
        return out

    def hand_off(self) -> tuple[list[EngineOutput], list[EngineRequest]]:
        """Elastic EP, this rank leaving: its step in flight completed (those outputs first), every request
        that can move (``Request.movable``) leaves it, as another rank takes it over; the rest stay to finish
        here. Returns (outputs, moved requests)."""
        outputs, moved = self.drain(), []
        for req in list(self.scheduler.requests.values()):
            if req.movable and req.request_id not in self.scheduler.remote:
                moved.append(req.hand_off(self.client_of.pop(req.request_id, 0)))
                self.scheduler.abort(req.request_id)
        if moved:
            logger.info("[DP rank %d] %d requests hand over to the staying ranks (%d output tokens so far)",
                        self.ps.dp_rank, len(moved), sum(len(m.resume.output_token_ids) for m in moved))
        return outputs, moved

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.in_flight is not None

    def kv_pending(self) -> bool:
        """Requests waiting on KV transfers (loads in flight, blocks held for another engine) or on
        their grammar's compile: the loop polls for their end."""
        return self.scheduler.kv_pending() or bool(self.compiling)

    def poll_kv(self) -> None:
        """Between steps: hand the workers what the connector decided since the last step (this process's
        worker side, and ``tp_publish`` sends it to this DP rank's TP workers), and take their report of
        finished KV transfers (this process's worker side gathers the TP workers')."""
        worker = self.runner.kv_connector
        if worker is None or not self.scheduler.kv_pending():
            return
        meta = self.kv_connector.build_connector_meta()
        if meta != type(meta)():
            if self.tp_publish is not None:
                self.tp_publish(KVLoad(msgspec.msgpack.encode(meta)))
            worker.start_load_kv(meta)
        self.scheduler.kv_finished(*worker.get_finished(), worker.get_failed_loads())

    def schedule(self, max_seqs: int | None = None):
        self.poll_kv()
        return self.scheduler.schedule(max_seqs)

    def _kv_meta(self) -> Optional[bytes]:
        if self.kv_connector is None:
            return None
        return msgspec.msgpack.encode(self.kv_connector.build_connector_meta())

    def run(self, batch, ep_counts=None, publish=None) -> list[EngineOutput]:
        """Execute a scheduled batch. In a DP wave an empty batch still runs the (empty) forward,
        so this rank takes part in the MoE collectives, unless no rank has tokens. With async scheduling
        the outputs are those of the step launched before this batch."""
        step = self.launch(batch, ep_counts, publish)
        if self.overlap:
            step, self.in_flight = self.in_flight, step
        return self.complete(step) if step is not None else []

    def drain(self) -> list[EngineOutput]:
        """Complete the step in flight (async scheduling), if any."""
        step, self.in_flight = self.in_flight, None
        return self.complete(step) if step is not None else []

    def before_schedule(self) -> list[EngineOutput]:
        """Async scheduling: complete the step in flight first when a request in it samples with rules or a
        grammar over its own output (the next step's sampling needs the token it is computing)."""
        if self.in_flight is not None and any(r.num_pending and (r.has_rules or r.grammar is not None)
                                              for r in self.scheduler.running):
            return self.drain()
        return []

    def launch(self, batch, ep_counts=None, publish=None):
        """Start a step (``run``'s first half): its requests are in flight, not scheduled again, until
        ``complete``. None when nothing comes back (an empty batch)."""
        kv_meta = self._kv_meta()
        if not batch:
            if ep_counts and any(ep_counts):
                self.runner.execute([], ep_counts, publish, kv_meta)
                if self.runner.drafter is not None:       # the other ranks' draft passes need this one's
                    self.runner.drafter.propose([], publish, lockstep=True)
            elif kv_meta is not None:                   # asynchronous loads start with no step to ride on
                if publish is not None and kv_meta != self._no_kv_meta:
                    publish(KVLoad(kv_meta))
                self.runner.kv_start_load(kv_meta)
            return None
        now = time.monotonic()
        for req, _ in batch:
            req.in_flight = not self.overlap        # (pipeline stages: not scheduled again until it completes)
            if req.scheduled_ts is None:
                req.scheduled_ts = now
        in_flight = self.runner.launch(batch, ep_counts, publish, kv_meta)
        in_flight.prompt_tokens = sum(min(n, req.prompt_len - req.num_computed) for req, n in batch
                                      if req.num_computed < req.prompt_len)
        for req, n in batch:
            req.num_computed += n
        for req in {id(r): r for r in in_flight.sample_reqs}.values():
            req.num_pending += 1
        return batch, ep_counts, publish, in_flight

    def complete(self, step) -> list[EngineOutput]:
        """Finish a launched step: take its samples, advance its requests, their outputs."""
        batch, ep_counts, publish, in_flight = step
        prompt_tokens = in_flight.prompt_tokens
        sampled = self.runner.collect(in_flight)
        for req, _ in batch:
            req.in_flight = False
        for req in {id(r): r for r in in_flight.sample_reqs}.values():
            req.num_pending -= 1
        # ended meanwhile (aborted, or async scheduling: stopped by the step before): its token is dropped
        batch = [(req, n) for req, n in batch if req.status is not Status.FINISHED]
        outputs = []
        self.num_prompt_tokens_computed += prompt_tokens
        drafter, generated = self.runner.drafter, 0
        for req, n in batch:
            samples = sampled.get(req.request_id)
            if samples is None:
                self.blocks.cache_full_blocks(req)
                continue
            # speculative drafts: keep the target's tokens up to and including its first disagreement
            drafts = req.spec_token_ids[:len(samples) - 1]
            kept = accepted_count([t for t, _ in samples], drafts)
            if drafter is not None:
                drafter.stats.add(len(drafts), kept)
            toks, lps = [], []
            for tok, lp in samples[:kept + 1]:
                req.append(tok, self.max_model_len)
                toks.append(tok)
                lps.append(lp)
                if req.finish_reason:
                    break
            req.num_computed = min(req.num_computed, req.num_known - 1)   # rejected drafts' KV is stale
            self.blocks.cache_full_blocks(req)
            generated += len(toks)
            if req.finish_reason:
                self.scheduler.finish(req)
            outputs.append(EngineOutput(req.request_id, toks, logprobs=lps if lps[0] else None,
                                        finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                                        num_prompt_tokens=req.prompt_len, num_cached_tokens=req.num_cached_tokens,
                                        kv_transfer_params=req.kv_transfer_out,
                                        times=req.times() if req.finish_reason else None,
                                        prompt_logprobs=self._prompt_logprobs(req)))
        if drafter is not None:
            drafter.propose([(req, row, start, req.num_computed - start) for req, row, start in self.runner.rows],
                            publish, lockstep=ep_counts is not None)
            drafter.log_every(self.stat_log.interval)
        self.stat_log.step(prompt_tokens, generated, self.scheduler, self.blocks)
        return outputs

    @staticmethod
    def _prompt_logprobs(req: Request):
        """The prompt logprobs, once, on a request's first output."""
        if req.params.prompt_logprobs is None or req.prompt_logprobs_sent:
            return None
        req.prompt_logprobs_sent = True
        return req.prompt_logprobs

    def step(self, publish=None) -> list[EngineOutput]:
        """Schedule and run one step (with async scheduling: outputs of the one before)."""
        out = self.before_schedule()
        return out + self.run(self.schedule(), publish=publish)

    def stats(self) -> EngineStats:
        s = self.scheduler
        eplb = self.runner.eplb
        return EngineStats(num_running=len(s.running), num_waiting=len(s.waiting) + len(self.compiling),
                           kv_usage=self.blocks.usage,
                           num_preemptions=s.num_preemptions, num_free_blocks=self.blocks.num_free,
                           num_total_blocks=self.num_blocks, num_requests_received=self.num_received,
                           eplb_balancedness=eplb.measured if eplb else -1.0,
                           eplb_rebalances=eplb.rebalances if eplb else 0,
                           prefix_cache_queries=self.blocks.queries, prefix_cache_hits=self.blocks.hits,
                           num_prompt_tokens_computed=self.num_prompt_tokens_computed,
                           **(self.runner.drafter.stats.engine_fields() if self.runner.drafter else {}))
