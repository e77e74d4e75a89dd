"""The served model's tokenizer and the token ids that end generation, as transformers uses them."""

from __future__ import annotations

import json
from pathlib import Path

from epplat.config import ConfigError


def load_tokenizer(model_dir: str):
    """The checkpoint's tokenizer, or ConfigError with one line."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise ConfigError(f"cannot load the tokenizer of {model_dir!r}: {e}") from None


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's tokenization of bad words: each word as written, and with a leading space when that is
    a different token sequence of the same length."""
    out: list[list[int]] = []
    for word in words:
        for prefix in ("", " "):
            ids = tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False)
            if ids and (not prefix or (ids[0] != out[-1][0] and len(ids) == len(out[-1]))):
                out.append(ids)
    return out


def eos_token_ids(model_dir: str, tokenizer) -> list[int]:
    """The ids that end generation, as transformers' generate uses them."""
    ids: list = []
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                ids = eos if isinstance(eos, list) else [eos]
                break
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return [int(i) for i in ids]
