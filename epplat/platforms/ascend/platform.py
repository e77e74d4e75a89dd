"""The ascend platform: device "npu" through torch_npu, HCCL collectives, torchair graphs."""

from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch

from epplat.core.ops import Kernels, bf16_grouped_mm
from epplat.platforms.interface import Platform

logger = logging.getLogger(__name__)


def traced_experts(x, topk_ids, topk_weights, w13, w2, act) -> Optional[torch.Tensor]:
    """bfloat16 experts while torchair traces a graph: counts stay on the device (cache_compile captures whole
    graphs, fullgraph=True, where the reference's host sync is an error); None (the reference) otherwise."""
    if torch.compiler.is_compiling() and x.dtype == torch.bfloat16 and x.shape[0]:   # 0 rows: an EP rank's dummy
        from epplat.core.moe.experts import capturable_experts
        return capturable_experts(x, topk_ids, topk_weights, w13, w2, act)
    return None


class AscendPlatform(Platform):
    name = "ascend"
    device_type = "npu"
    dist_backend = "hccl"
    ray_resource = "NPU"            # Ray's name for Ascend NPUs
    default_all2all = "hccl"
    default_graph_runner = "eager"      # "torchair" with torchair_graph_config.enabled (see configure)
    # torch ops; the NPU's grouped GEMM takes bfloat16
    kernels = Kernels(grouped_mm=bf16_grouped_mm, experts=traced_experts)

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

    @classmethod
    def apply_additional_config(cls, cfg) -> None:
        """Check --additional-config (vllm-ascend's keys) and apply the scheduler options."""
        from epplat.config import ConfigError
        from epplat.platforms.ascend.ascend_config import parse
        acfg = parse(cfg.additional_config, cfg.enforce_eager)
        if acfg.torchair_graph_config.use_cached_graph:
            # cache_compile captures whole graphs (fullgraph=True): nothing in a decode step may sync with the host
            syncs = [what for what, on in (
                ("expert parallelism (the hccl all2all's split sizes)",
                 cfg.parallel.enable_expert_parallel and cfg.parallel.world_size > 1),
                ("--quantization ascend (W8A8's expert counts)", cfg.model.quantization == "ascend")) if on]
            if syncs:
                raise ConfigError(f"torchair_graph_config.use_cached_graph compiles whole decode graphs, which "
                                  f"{' and '.join(syncs)} cannot be part of (a host sync); leave use_cached_graph off")
        sched = acfg.ascend_scheduler_config
        if sched.enabled:
            cfg.scheduler.enable_chunked_prefill = sched.enable_chunked_prefill
            max_len = cfg.model.max_model_len or cfg.model.hf_config().get("max_position_embeddings") or 2048
            if not sched.enable_chunked_prefill and cfg.scheduler.max_num_batched_tokens < max_len:
                raise ConfigError(f"ascend_scheduler_config runs prefills whole: --max-num-batched-tokens "
                                  f"({cfg.scheduler.max_num_batched_tokens}) must be at least --max-model-len "
                                  f"({max_len}), or set enable_chunked_prefill")

    def configure(self, cfg) -> None:
        from epplat.platforms.ascend import ascend_config
        acfg = ascend_config.parse(cfg.additional_config, cfg.enforce_eager)
        ascend_config.set_current(acfg)
        if acfg.torchair_graph_config.enabled:
            self.default_graph_runner = "torchair"
        g = acfg.torchair_graph_config
        deepseek = any(a.startswith("Deepseek") for a in cfg.model.hf_config().get("architectures") or [])
        # the multistream options act on DeepSeek's MLA and shared experts (torchair_runner); the others not yet
        idle = [k for k, on in (
            ("enable_multistream_mla", g.enable_multistream_mla and not deepseek),
            ("enable_multistream_moe", g.enable_multistream_moe and not deepseek),
            ("enable_prefill_optimizations", acfg.enable_prefill_optimizations),  # DeepSeek (MLA) prefill
            ("enable_super_kernel", g.enable_super_kernel)) if on]
        if idle:
            logger.warning("--additional-config %s: change nothing here (the multistream options overlap DeepSeek's "
                           "MLA query path and shared experts; prefill optimizations and super kernels are not "
                           "implemented)", ", ".join(idle))

    @classmethod
    def device_count(cls) -> Optional[int]:
        import torch_npu  # noqa: F401
        return torch.npu.device_count()         # ASCEND_RT_VISIBLE_DEVICES applied

    def device(self, local_rank: int = 0) -> torch.device:
        import torch_npu  # noqa: F401
        from epplat.platforms.ascend import hccl_env
        env = hccl_env.check()
        if env:
            logger.info("HCCL environment: %s", " ".join(env))
        torch.npu.set_device(local_rank)
        return torch.device("npu", local_rank)

    def kv_cache_bytes(self, cache_cfg, weight_bytes, device, profile=None) -> int:
        """--gpu-memory-utilization of the NPU, less weights, the peak activations of a profiling run of
        the largest step, and memory outside torch (other processes, HCCL buffers, the runtime)."""
        if cache_cfg.kv_cache_memory_bytes:
            return cache_cfg.kv_cache_memory_bytes
        from epplat.config import ConfigError
        npu, gib = torch.npu, 1 << 30
        npu.synchronize(device)
        npu.empty_cache()
        npu.reset_peak_memory_stats(device)
        base = npu.memory_allocated(device)
        scratch = profile() if profile else 0
        npu.synchronize(device)
        activations = max(0, npu.max_memory_allocated(device) - base - scratch)
        npu.empty_cache()
        free, total = npu.mem_get_info(device)
        outside = total - free - npu.memory_reserved(device)
        budget = int(total * cache_cfg.gpu_memory_utilization - npu.memory_allocated(device) - activations - outside)
        logger.info("Memory profiling: %.2f GiB of %.2f GiB usable (--gpu-memory-utilization %.2f); weights %.2f GiB, "
                    "peak activations %.2f GiB, outside torch %.2f GiB; available KV cache memory %.2f GiB",
                    total * cache_cfg.gpu_memory_utilization / gib, total / gib, cache_cfg.gpu_memory_utilization,
                    weight_bytes / gib, activations / gib, outside / gib, max(budget, 0) / gib)
        if budget <= 0:
            raise ConfigError(f"no NPU memory left for the KV cache: raise --gpu-memory-utilization "
                              f"({cache_cfg.gpu_memory_utilization}) or lower --max-num-batched-tokens")
        return budget

    def synchronize(self) -> None:
        torch.npu.synchronize()

    def log_prefix(self) -> str:
        return "NPU"
