"""``--additional-config`` on the ascend platform: vllm-ascend's keys, typed, unknown keys rejected.

    {"torchair_graph_config": {"enabled": true, "graph_batch_sizes": [8, 16], "use_cached_graph": false,
                               "enable_multistream_moe": false, "enable_multistream_mla": false,
                               "enable_super_kernel": false},
     "ascend_scheduler_config": {"enabled": true, "enable_chunked_prefill": false},
     "enable_weight_nz_layout": false, "enable_prefill_optimizations": false}

The rules between keys are vllm-ascend's (graph options need ``enabled``; super kernels
need multistream MoE; graph mode and ``--enforce-eager`` exclude each other).
"""

from __future__ import annotations

from typing import Optional

import msgspec

from epplat.config import ConfigError


class TorchairGraphConfig(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = False
    graph_batch_sizes: list[int] = []
    use_cached_graph: bool = False
    enable_multistream_moe: bool = False
    enable_multistream_mla: bool = False
    enable_super_kernel: bool = False


class AscendSchedulerConfig(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = False
    enable_chunked_prefill: bool = False


class AscendConfig(msgspec.Struct, forbid_unknown_fields=True):
    torchair_graph_config: TorchairGraphConfig = msgspec.field(default_factory=TorchairGraphConfig)
    ascend_scheduler_config: AscendSchedulerConfig = msgspec.field(default_factory=AscendSchedulerConfig)
    enable_weight_nz_layout: bool = False
    enable_prefill_optimizations: bool = False


def parse(raw: dict, enforce_eager: bool = False) -> AscendConfig:
    """The typed config, or ConfigError with one line naming the offending key."""
    try:
        cfg = msgspec.convert(raw or {}, AscendConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"--additional-config: {e}") from None
    g = cfg.torchair_graph_config
    if not g.enabled:
        on = [k for k in ("use_cached_graph", "enable_multistream_moe", "enable_multistream_mla",
                          "enable_super_kernel") if getattr(g, k)] + (["graph_batch_sizes"] if g.graph_batch_sizes else [])
        if on:
            raise ConfigError(f"--additional-config: torchair_graph_config.{on[0]} is valid only when "
                              "torchair_graph_config.enabled is true")
    if g.enable_super_kernel and not g.enable_multistream_moe:
        raise ConfigError("--additional-config: torchair_graph_config.enable_super_kernel needs "
                          "enable_multistream_moe")
    bad = [b for b in g.graph_batch_sizes if b < 1]
    if bad:
        raise ConfigError(f"--additional-config: torchair_graph_config.graph_batch_sizes must be positive, got {bad[0]}")
    if g.enabled and enforce_eager:
        raise ConfigError("torchair graph mode (torchair_graph_config.enabled) and --enforce-eager exclude each other")
    return cfg


_current: Optional[AscendConfig] = None


def set_current(cfg: AscendConfig) -> None:
    """The config of this engine process (set by the platform before the model is built)."""
    global _current
    _current = cfg


def current() -> AscendConfig:
    return _current if _current is not None else AscendConfig()
