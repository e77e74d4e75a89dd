"""The engine's periodic log line (vLLM's LoggingStatLogger line: throughput, queue, KV usage,
prefix cache hit rate over the last 1,000 requests), every EPPLAT_LOG_STATS_INTERVAL seconds (vLLM's VLLM_LOG_STATS_INTERVAL,
default 10) while the engine has work."""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger(__name__)


def _interval() -> float:
    raw = os.environ.get("EPPLAT_LOG_STATS_INTERVAL") or os.environ.get("VLLM_LOG_STATS_INTERVAL") or "10"
    try:
        return float(raw)
    except ValueError:
        return 10.0


class StatLog:
    def __init__(self, engine_index: int):
        self.engine_index = engine_index
        self.interval = _interval()
        self.last = time.monotonic()
        self.prompt_tokens = self.generation_tokens = 0

    def step(self, prompt_tokens: int, generation_tokens: int, scheduler, blocks) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += generation_tokens
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        dt, self.last = now - self.last, now
        logger.info("Engine %03d: Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                    "Running: %d reqs, Waiting: %d reqs, GPU KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                    self.engine_index, self.prompt_tokens / dt, self.generation_tokens / dt, len(scheduler.running),
                    len(scheduler.waiting), 100 * blocks.usage, 100 * blocks.recent_hit_rate)
        self.prompt_tokens = self.generation_tokens = 0
