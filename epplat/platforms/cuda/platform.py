"""The cuda platform: device per local rank, NCCL, KV cache from --gpu-memory-utilization."""

from __future__ import annotations

from typing import Optional

import torch

from epplat.platforms.interface import Platform


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    default_graph_runner = "cuda_graphs"

    def __init__(self):
        import importlib.util
        if importlib.util.find_spec("triton"):
            from epplat.core.model import attention
            from epplat.platforms.cuda.triton_attention import decode_attention
            attention.DECODE_KERNELS["cuda"] = decode_attention

    @classmethod
    def check(cls) -> Optional[str]:
        if not torch.cuda.is_available():
            return "no CUDA device visible" if torch.version.cuda else "torch built without CUDA"
        return None

    def device(self, local_rank: int = 0) -> torch.device:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)

    def kv_cache_bytes(self, cache_cfg, weight_bytes, device) -> int:
        if cache_cfg.kv_cache_memory_bytes:
            return cache_cfg.kv_cache_memory_bytes
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free - torch.cuda.memory_reserved(device)
        budget = total * cache_cfg.gpu_memory_utilization - used_by_others - torch.cuda.memory_reserved(device)
        return max(0, int(budget * 0.9))  # headroom for activations until a profiling run sizes them

    def synchronize(self) -> None:
        torch.cuda.synchronize()
