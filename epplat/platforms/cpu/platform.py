"""The cpu platform: gloo for collectives, KV cache sized by EPPLAT_CPU_KVCACHE_SPACE."""

from __future__ import annotations

from epplat.config import cpu_kv_cache_bytes
from epplat.platforms.interface import Platform


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"

    def kv_cache_bytes(self, cache_cfg, weight_bytes, device) -> int:
        return cache_cfg.kv_cache_memory_bytes or cpu_kv_cache_bytes()
