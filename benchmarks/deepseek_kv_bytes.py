"""KV cache bytes per token of DeepSeek models as epplat allocates them (MLA: one latent "head" per
layer), against the same models with attention decompressed into per-head keys and values.

One MLA attention module per model is built on the meta device from the public checkpoints'
config values (no weights); the bytes come from its own cache shapes (the ones the model
runner allocates for every layer) times the layer count. Usage: python benchmarks/deepseek_kv_bytes.py [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

import torch

from epplat.core.distributed.parallel_state import ParallelState
from epplat.core.model import deepseek
from epplat.core.model.mla import MLAttention

# config.json values of the public checkpoints (docs: /work/shared/reference/deepseek.md's table)
SHAPES = {
    "DeepSeek-V2-Lite": dict(num_hidden_layers=27, hidden_size=2048, num_attention_heads=16, q_lora_rank=None,
                             kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, moe_intermediate_size=1408,
                             intermediate_size=10944, first_k_dense_replace=1, vocab_size=102400),
    "DeepSeek-V3": dict(num_hidden_layers=61, hidden_size=7168, num_attention_heads=128, q_lora_rank=1536,
                        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1, moe_intermediate_size=2048,
                        intermediate_size=18432, first_k_dense_replace=3, vocab_size=129280, n_group=8, topk_group=4,
                        topk_method="noaux_tc", scoring_func="sigmoid"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    elt = torch.tensor([], dtype=getattr(torch, ap.parse_args().dtype)).element_size()
    print("| model | MLA latent cache (epplat) | decompressed K/V | saving |")
    print("| --- | --- | --- | --- |")
    for name, hf in SHAPES.items():
        cfg = deepseek.parse_config(hf)
        with torch.device("meta"):
            attn = MLAttention(cfg, deepseek.DeepseekForCausalLM.make_rope(cfg), ParallelState(), torch.bfloat16)
        mla = cfg.num_layers * sum(torch.Size(s).numel() for s in attn.kv_cache_shapes(1, 1)) * elt
        full = cfg.num_layers * cfg.num_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * elt
        print(f"| {name} | {mla:,} bytes/token ({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim} values x "
              f"{cfg.num_layers} layers) | {full:,} bytes/token | {full / mla:.1f}x |")


if __name__ == "__main__":
    main()
