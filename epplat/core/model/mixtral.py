"""Mixtral (MixtralForCausalLM): config parsing and checkpoint tensor names."""

from __future__ import annotations

from epplat.core.model import qwen3_moe
from epplat.core.model.decoder import DecoderConfig

_EXPERT_PROJ = {"w1": "gate", "w3": "up", "w2": "down"}


def parse_config(hf: dict) -> DecoderConfig:
    if hf.get("sliding_window"):
        raise ValueError("Mixtral with sliding_window attention is not supported yet")
    heads = hf["num_attention_heads"]
    return DecoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position=hf.get("max_position_embeddings", 32768),
        rope_theta=qwen3_moe._rope_theta(hf), rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["intermediate_size"], intermediate_size=hf["intermediate_size"],
        norm_topk_prob=True, qk_norm=False, act=hf.get("hidden_act", "silu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False))


def canonical_name(name: str) -> str:
    """model.layers.0.block_sparse_moe.experts.3.w1.weight -> layers.0.mlp.experts.3.gate."""
    name = name.removeprefix("model.").removesuffix(".weight").replace(".block_sparse_moe.", ".mlp.")
    if ".experts." in name:
        head, proj = name.rsplit(".", 1)
        name = f"{head}.{_EXPERT_PROJ[proj]}"
    return name
