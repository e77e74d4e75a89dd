"""The kernel warm-up before serving (ModelRunner.warm_up, on for platforms whose kernels compile
on first use): its steps touch only the scratch block, and the engine's greedy tokens after it
equal transformers'. Runs on the cpu platform with the warm-up switched on."""

from __future__ import annotations

import logging

import torch

from epplat.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from epplat.core.engine.core import EngineCore
from epplat.platforms.cpu.platform import CpuPlatform
from hf_oracle import hf_greedy
from test_engine import PROMPTS, greedy, run


class WarmedCpuPlatform(CpuPlatform):
    compiles_kernels = True


def test_warm_up_keeps_the_cache_and_the_tokens(qwen3_moe_dir, caplog):
    cfg = EngineConfig(ModelConfig(str(qwen3_moe_dir), dtype="float32"),
                       scheduler=SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=40),
                       cache=CacheConfig(block_size=16, kv_cache_memory_bytes=16 << 20))
    with caplog.at_level(logging.INFO):
        core = EngineCore(cfg, WarmedCpuPlatform(), torch.device("cpu"))
    assert any("Kernel warm-up (" in r.getMessage() for r in caplog.records)
    runner = core.runner
    for layer in runner.model.layers:
        k, v = layer.self_attn.kv_cache
        assert not k[: runner.pad_block + 1].any() and not v[: runner.pad_block + 1].any()
        assert k[runner.pad_block + 1].any()          # the scratch block took the warm-up's writes
    got, _ = run(core, PROMPTS, [greedy(6)] * len(PROMPTS))
    assert got == hf_greedy(qwen3_moe_dir, PROMPTS, 6, ignore_eos=True)
