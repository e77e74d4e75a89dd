"""The engine core: scheduler + KV blocks + model runner, stepped in a loop."""

from __future__ import annotations

import logging

from epplat.config import ConfigError, EngineConfig
from epplat.core.engine.block_manager import BlockManager
from epplat.core.engine.model_runner import ModelRunner
from epplat.core.engine.protocol import EngineOutput, EngineRequest, EngineStats
from epplat.core.engine.request import Request
from epplat.core.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, cfg: EngineConfig, platform, device, **ep):
        self.cfg = cfg
        self.runner = ModelRunner(cfg, platform, device, **ep)
        hf_max = self.runner.model_cfg.max_position
        self.max_model_len = cfg.model.max_model_len or hf_max
        if self.max_model_len > hf_max:
            raise ConfigError(f"--max-model-len {self.max_model_len} is larger than the model's "
                              f"max_position_embeddings ({hf_max})")
        num_blocks = self.runner.num_blocks_from_memory()
        bs = cfg.cache.block_size
        tokens = num_blocks * bs
        if tokens < self.max_model_len:
            raise ConfigError(f"the KV cache holds {tokens} tokens, fewer than --max-model-len "
                              f"{self.max_model_len}; lower --max-model-len or give the KV cache more memory")
        self.runner.allocate_kv_cache(num_blocks)
        prefix = platform.log_prefix()
        logger.info("%s KV cache size: %s tokens", prefix, f"{tokens:,}")
        logger.info("Maximum concurrency for %s tokens per request: %.2fx",
                    f"{self.max_model_len:,}", tokens / self.max_model_len)
        self.blocks = BlockManager(num_blocks, bs)
        self.scheduler = Scheduler(cfg.scheduler, self.blocks)
        self.num_blocks = num_blocks

    def add_request(self, er: EngineRequest) -> None:
        self.scheduler.add(Request(er))

    def abort(self, request_ids: list[str]) -> list[EngineOutput]:
        out = []
        for rid in request_ids:
            req = self.scheduler.abort(rid)
            if req is not None:
                out.append(EngineOutput(rid, [], finish_reason="abort", num_prompt_tokens=req.prompt_len))
        return out

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[EngineOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        sampled = self.runner.execute(batch)
        outputs = []
        for req, n in batch:
            req.num_computed += n
            if req.request_id not in sampled:
                continue
            tok, lp = sampled[req.request_id]
            req.append(tok, self.max_model_len)
            outputs.append(EngineOutput(req.request_id, [tok], logprobs=[lp] if lp else None,
                                        finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                                        num_prompt_tokens=req.prompt_len))
            if req.finish_reason:
                self.scheduler.finish(req)
        return outputs

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(num_running=len(s.running), num_waiting=len(s.waiting), kv_usage=self.blocks.usage,
                           num_preemptions=s.num_preemptions, num_free_blocks=self.blocks.num_free,
                           num_total_blocks=self.num_blocks)
