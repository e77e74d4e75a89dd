"""The cpu platform: gloo for collectives, KV cache sized by EPPLAT_CPU_KVCACHE_SPACE."""

from __future__ import annotations

import math

import numpy as np
import torch

from epplat.config import cpu_kv_cache_bytes
from epplat.platforms.interface import Platform


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    # Below this many tokens a step is a skinny-GEMM decode that extra threads slow down
    # (and the API server process needs a core); above it, GEMMs scale with threads.
    MULTI_THREAD_TOKENS = 128

    def __init__(self):
        self.max_threads = torch.get_num_threads()

    def before_step(self, num_tokens: int) -> None:
        torch.set_num_threads(self.max_threads if num_tokens >= self.MULTI_THREAD_TOKENS else 1)

    def kv_cache_bytes(self, cache_cfg, weight_bytes, device, profile=None) -> int:
        return cache_cfg.kv_cache_memory_bytes or cpu_kv_cache_bytes()

    def zeros(self, shape, dtype, device) -> torch.Tensor:
        # numpy's zeros is calloc: the OS hands out zero pages lazily, where torch.zeros
        # would memset gigabytes of KV cache at startup.
        itemsize = torch.tensor([], dtype=dtype).element_size()
        raw = np.zeros(math.prod(shape) * itemsize, dtype=np.uint8)
        return torch.from_numpy(raw).view(dtype).view(shape)
