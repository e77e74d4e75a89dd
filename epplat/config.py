"""Typed configs (model, parallel, scheduler, cache, engine) and their checks.

The CLI fills these from vLLM-named flags; engine cores receive them as JSON
(msgspec), never pickled. ``ConfigError`` carries one line meant for the user.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import msgspec

DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A bad flag or config value; the message is one line for the user."""


class ModelConfig(msgspec.Struct):
    model: str
    served_model_name: Optional[str] = None
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    seed: int = 0
    quantization: Optional[str] = None

    def hf_config(self) -> dict:
        path = Path(self.model) / "config.json"
        if not path.is_file():
            raise ConfigError(f"model {self.model!r}: no config.json there "
                              "(give a local Hugging Face checkpoint directory)")
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"model {self.model!r}: config.json is not valid JSON: {e}") from None
        from transformers import AutoConfig  # fills in the defaults a saved config.json omits
        try:
            return AutoConfig.from_pretrained(self.model).to_dict()
        except (ValueError, KeyError) as e:
            raise ConfigError(f"model {self.model!r}: {str(e).splitlines()[0]}") from None


class ParallelConfig(msgspec.Struct):
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    all2all_backend: Optional[str] = None  # None: the platform's default

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size


class SchedulerConfig(msgspec.Struct):
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True


class CacheConfig(msgspec.Struct):
    block_size: int = 16
    num_gpu_blocks_override: Optional[int] = None
    kv_cache_memory_bytes: Optional[int] = None
    gpu_memory_utilization: float = 0.9


class EngineConfig(msgspec.Struct):
    model: ModelConfig
    parallel: ParallelConfig = msgspec.field(default_factory=ParallelConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    platform: str = "cpu"
    enforce_eager: bool = False

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @staticmethod
    def from_json(data: bytes) -> "EngineConfig":
        return msgspec.json.decode(data, type=EngineConfig)


def cpu_kv_cache_bytes() -> int:
    """KV cache budget on the cpu platform: EPPLAT_CPU_KVCACHE_SPACE GiB (vLLM's VLLM_CPU_KVCACHE_SPACE)."""
    raw = os.environ.get("EPPLAT_CPU_KVCACHE_SPACE") or os.environ.get("VLLM_CPU_KVCACHE_SPACE") or "4"
    try:
        gib = float(raw)
    except ValueError:
        raise ConfigError(f"EPPLAT_CPU_KVCACHE_SPACE={raw!r} is not a number of GiB") from None
    if gib <= 0:
        raise ConfigError("EPPLAT_CPU_KVCACHE_SPACE must be > 0 GiB")
    return int(gib * (1 << 30))
