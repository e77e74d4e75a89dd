"""Supported architectures, keyed by the ``architectures`` entry of config.json."""

from __future__ import annotations

from epplat.core.model import deepseek, mixtral, qwen3_moe

ARCHITECTURES = {
    "Qwen3MoeForCausalLM": qwen3_moe,
    "MixtralForCausalLM": mixtral,
    "DeepseekV2ForCausalLM": deepseek,
    "DeepseekV3ForCausalLM": deepseek,
}


def architecture(hf: dict):
    """The module (parse_config, canonical_name) for a Hugging Face config dict."""
    for name in hf.get("architectures") or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ValueError(f"architectures {hf.get('architectures')} not supported; "
                     f"supported: {', '.join(ARCHITECTURES)}")
