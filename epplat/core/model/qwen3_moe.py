"""Qwen3-MoE (Qwen3MoeForCausalLM): config parsing and checkpoint tensor names."""

from __future__ import annotations

from epplat.core.model.decoder import DecoderConfig


def parse_config(hf: dict) -> DecoderConfig:
    layers = hf["num_hidden_layers"]
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or [])
    dense |= {i for i in range(layers) if (i + 1) % step}
    heads = hf["num_attention_heads"]
    return DecoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=layers,
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position=hf.get("max_position_embeddings", 32768),
        rope_theta=_rope_theta(hf), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        num_experts=hf.get("num_experts") or hf.get("num_local_experts", 0), top_k=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"], intermediate_size=hf.get("intermediate_size", 0),
        norm_topk_prob=hf.get("norm_topk_prob", False), qk_norm=True,
        attention_bias=hf.get("attention_bias", False), act=hf.get("hidden_act", "silu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False), dense_layers=dense)


def _rope_theta(hf: dict) -> float:
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rp.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"rope type {rp['rope_type']!r} is not supported yet")
    return float(hf.get("rope_theta") or rp.get("rope_theta") or 10000.0)


def canonical_name(name: str) -> str:
    """model.layers.3.mlp.experts.7.gate_proj.weight -> layers.3.mlp.experts.7.gate."""
    name = name.removeprefix("model.")
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    elif name.endswith(".bias"):
        name = name[: -len(".bias")] + "_bias"
    if ".experts." in name:
        for proj in ("gate", "up", "down"):
            name = name.replace(f".{proj}_proj", f".{proj}")
    return name
