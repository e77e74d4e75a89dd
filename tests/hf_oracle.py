"""The correctness oracle: Hugging Face transformers' greedy ``generate`` on a checkpoint."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4)
def _model(model_dir: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model_dir, prompts: list[list[int]], max_tokens: int, ignore_eos: bool = False) -> list[list[int]]:
    """New token ids of greedy generation, one prompt at a time (EOS included when it ends one)."""
    model = _model(str(model_dir))
    out = []
    for ids in prompts:
        kwargs = {"eos_token_id": None} if ignore_eos else {}
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                               pad_token_id=model.generation_config.pad_token_id, **kwargs)
        out.append(g[0, len(ids):].tolist())
    return out
