"""The cpu platform: gloo for collectives, KV cache sized by EPPLAT_CPU_KVCACHE_SPACE, ranks bound to the
core sets of EPPLAT_CPU_OMP_THREADS_BIND (its devices)."""

from __future__ import annotations

from typing import Optional

import torch

from epplat.config import cpu_kv_cache_bytes
from epplat.core.ops import Kernels
from epplat.platforms.cpu import core_binding, cpu_kernels, huge_pages
from epplat.platforms.interface import Platform


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    ray_resource = "CPU"            # a device is one CPU of a Ray node
    # Below this many tokens torch's ops run on one thread (fork/join costs more than the small
    # ops gain); the C kernels, which hold most of a decode step, use every thread.
    MULTI_THREAD_TOKENS = 128

    def __init__(self):
        self.max_threads = torch.get_num_threads()
        self.kernels = cpu_kernel_record()

    def log_prefix(self) -> str:
        return "CPU"

    @classmethod
    def device_count(cls) -> Optional[int]:
        sets = core_binding.core_sets()
        return None if sets is None else len(sets)

    def device(self, local_rank: int = 0) -> torch.device:
        core_binding.bind(local_rank)
        return torch.device("cpu")

    def before_step(self, num_tokens: int) -> None:
        cpu_kernels.THREADS = self.max_threads
        torch.set_num_threads(self.max_threads if num_tokens >= self.MULTI_THREAD_TOKENS else 1)

    def auto_dtype(self, checkpoint_dtype: str) -> tuple[str, Optional[str]]:
        if checkpoint_dtype == "float16":       # as vLLM's CPU backend does
            return "bfloat16", "float16 GEMMs are slow on the cpu platform"
        return checkpoint_dtype, None

    def slower_path(self, dtype: torch.dtype) -> Optional[str]:
        if dtype != torch.float32 and cpu_kernels.load() is not None:
            name = str(dtype).removeprefix("torch.")
            return (f"the cpu platform's C kernels take float32 only: in {name} experts, attention, norms and "
                    "linears run torch ops (slower); --dtype float32 runs the C kernels")
        return None

    def kv_cache_bytes(self, cache_cfg, weight_bytes, device, profile=None) -> int:
        return cache_cfg.kv_cache_memory_bytes or cpu_kv_cache_bytes()

    def zeros(self, shape, dtype, device) -> torch.Tensor:
        # calloc'd (torch.zeros would memset gigabytes of KV cache at startup), on huge pages
        return huge_pages.zeros(shape, dtype)


def cpu_kernel_record() -> Kernels:
    """The C kernels where they compiled and load (they stand in for torch ops where they win), else torch."""
    if cpu_kernels.load() is None:
        return Kernels()
    from epplat.platforms.cpu import fused_layer
    return Kernels(linear=cpu_kernels.linear, rms_norm=cpu_kernels.rms_norm, rope=cpu_kernels.rope,
                   kv_write=cpu_kernels.write_kv, decode_attention=cpu_kernels.decode_attention,
                   route=cpu_kernels.route_topk, experts=cpu_kernels.moe_experts, sample=cpu_kernels.sample,
                   apply_bitmask=cpu_kernels.apply_bitmask,
                   decoder_layer=fused_layer.decode_layer)
