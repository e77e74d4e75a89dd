"""The cuda platform: device per local rank, NCCL, KV cache from --gpu-memory-utilization."""

from __future__ import annotations

from typing import Optional

import logging

import torch

from epplat.config import ConfigError
from epplat.platforms.interface import Platform

logger = logging.getLogger(__name__)


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    default_graph_runner = "cuda_graphs"
    compiles_kernels = True      # Triton: the engine warms every kernel variant up before serving
    # the --max-num-batched-tokens default, from serving 2048-token prompts 16 at a time on an H200
    # (docs/benchmarks.md, runs 3 and 5): 8192 gave 4.7x the prompt throughput of 2048, and 16384
    # 17% more than 8192 with a quarter of its TTFT p99 and the same ITL p99
    default_max_num_batched_tokens = 16384

    def __init__(self):
        from epplat.platforms.cuda.kernels import cuda_kernels
        self.kernels = cuda_kernels()

    def slower_path(self, dtype: torch.dtype) -> Optional[str]:
        import importlib.util
        if importlib.util.find_spec("triton") is None:
            return ("triton not installed: attention, KV writes, norms, rope, routing and experts run torch "
                    "ops (slower; pip install triton)")
        return None

    @classmethod
    def check(cls) -> Optional[str]:
        if not torch.cuda.is_available():
            return "no CUDA device visible" if torch.version.cuda else "torch built without CUDA"
        return None

    @classmethod
    def device_count(cls) -> Optional[int]:
        return torch.cuda.device_count()        # CUDA_VISIBLE_DEVICES applied

    def device(self, local_rank: int = 0) -> torch.device:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)

    def kv_cache_bytes(self, cache_cfg, weight_bytes, device, profile=None) -> int:
        """--gpu-memory-utilization of the GPU, less weights, the peak activations of a profiling
        run of the largest step, and memory outside torch (other processes, NCCL, CUDA context)."""
        if cache_cfg.kv_cache_memory_bytes:
            return cache_cfg.kv_cache_memory_bytes
        gib = 1 << 30
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        scratch = profile() if profile else 0
        torch.cuda.synchronize(device)
        activations = max(0, torch.cuda.max_memory_allocated(device) - base - scratch)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        outside = total - free - torch.cuda.memory_reserved(device)
        budget = int(total * cache_cfg.gpu_memory_utilization - torch.cuda.memory_allocated(device)
                     - activations - outside)
        logger.info("Memory profiling: %.2f GiB of %.2f GiB usable (--gpu-memory-utilization %.2f); weights "
                    "%.2f GiB, peak activations %.2f GiB, outside torch %.2f GiB; available KV cache memory "
                    "%.2f GiB", total * cache_cfg.gpu_memory_utilization / gib, total / gib,
                    cache_cfg.gpu_memory_utilization, weight_bytes / gib, activations / gib, outside / gib,
                    max(budget, 0) / gib)
        if budget <= 0:
            raise ConfigError(f"no GPU memory left for the KV cache: raise --gpu-memory-utilization "
                              f"({cache_cfg.gpu_memory_utilization}) or lower --max-num-batched-tokens")
        return budget

    def synchronize(self) -> None:
        torch.cuda.synchronize()
