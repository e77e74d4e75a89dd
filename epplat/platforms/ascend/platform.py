"""The ascend platform: device "npu" through torch_npu, HCCL collectives."""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from epplat.platforms.interface import Platform


class AscendPlatform(Platform):
    name = "ascend"
    device_type = "npu"
    dist_backend = "hccl"

    @classmethod
    def check(cls) -> Optional[str]:
        if importlib.util.find_spec("torch_npu") is None:
            return "torch_npu not installed (pip install epplat[ascend] next to CANN)"
        try:
            import torch_npu  # noqa: F401
        except Exception as e:  # a missing CANN library shows up here
            return f"torch_npu failed to load: {str(e).splitlines()[0]}"
        if not torch.npu.is_available():
            return "no Ascend NPU visible"
        return None

    def device(self, local_rank: int = 0) -> torch.device:
        import torch_npu  # noqa: F401
        torch.npu.set_device(local_rank)
        return torch.device("npu", local_rank)

    def kv_cache_bytes(self, cache_cfg, weight_bytes, device, profile=None) -> int:
        if cache_cfg.kv_cache_memory_bytes:
            return cache_cfg.kv_cache_memory_bytes
        free, total = torch.npu.mem_get_info(device)
        return max(0, int(total * cache_cfg.gpu_memory_utilization - (total - free)))

    def synchronize(self) -> None:
        torch.npu.synchronize()
