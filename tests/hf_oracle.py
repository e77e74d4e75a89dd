"""The correctness oracle: Hugging Face transformers' greedy ``generate`` on a checkpoint, in float32."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4)
def _model(model_dir: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model_dir, prompt_token_ids_list: list[list[int]], max_tokens: int,
              ignore_eos: bool = False) -> list[list[int]]:
    """The new token ids of greedy generation, one prompt at a time.

    A sequence that ends in EOS keeps that EOS and nothing after it (as vLLM returns it);
    ``ignore_eos`` generates ``max_tokens`` tokens regardless.
    """
    model = _model(str(model_dir))
    gc = model.generation_config
    eos = set() if ignore_eos else {gc.eos_token_id} if isinstance(gc.eos_token_id, int) else set(gc.eos_token_id or ())
    out = []
    for ids in prompt_token_ids_list:
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                               pad_token_id=gc.pad_token_id, **({"eos_token_id": None} if ignore_eos else {}))
        new = g[0, len(ids):].tolist()
        end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        out.append(new[:end])
    return out


def hf_greedy_texts(model_dir, prompt_token_ids_list: list[list[int]], max_tokens: int) -> list[str]:
    """``hf_greedy`` with ``ignore_eos``, each decoded as the server's text (special tokens skipped)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok.decode(r, skip_special_tokens=True)
            for r in hf_greedy(model_dir, prompt_token_ids_list, max_tokens, ignore_eos=True)]
