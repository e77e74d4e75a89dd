"""The oracle's copy of a DeepSeek-V3-layout fp8 checkpoint: every fp8 weight multiplied out with its
128x128 block scales (float32, rounded once to ``dtype``), the scales and ``quantization_config``
dropped, so transformers (and an unquantized epplat run) load the very weights the fp8 checkpoint holds."""

from __future__ import annotations

from pathlib import Path

import torch


def write_dequantized(src, dst, dtype=torch.float32) -> Path:
    from epplat.core.model.checkpoint_rewrite import rewrite_checkpoint
    from epplat.core.model.fp8_blocks import dequantize_blocks
    block = []

    def config(cfg):
        block.append(cfg.pop("quantization_config")["weight_block_size"][0])
        name = str(dtype).removeprefix("torch.")
        return {**cfg, "torch_dtype": name, "dtype": name}

    def tensors(k, t, shard):
        if k.endswith(".weight_scale_inv"):
            return {}
        scale = shard.get(k + "_scale_inv")
        return {k: (dequantize_blocks(t, scale, block[0], dtype) if scale is not None else t.to(dtype)).contiguous()}
    return rewrite_checkpoint(src, dst, tensors, config)
