"""What the API server takes from the checkpoint (or from flags) before serving, with vLLM's meanings:
--generation-config (the sampling defaults of generation_config.json), --chat-template (a file or
an inline Jinja template), --tokenizer (another tokenizer folder)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from epplat.config import ConfigError

logger = logging.getLogger("epplat.server")

# vLLM's: the generation_config.json fields that become request defaults (max_new_tokens: max_tokens)
SAMPLING_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")


def sampling_defaults(model_dir: str, generation_config: str) -> dict:
    """--generation-config: 'vllm' none; 'auto' the checkpoint's generation_config.json; else that folder's."""
    if generation_config == "vllm":
        return {}
    folder = Path(model_dir if generation_config == "auto" else generation_config)
    path = folder / "generation_config.json"
    if not path.is_file():
        if generation_config != "auto":
            raise ConfigError(f"--generation-config {generation_config}: no generation_config.json there")
        return {}
    try:
        gc = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"--generation-config: {path} is not JSON: {e}") from None
    out = {("max_tokens" if k == "max_new_tokens" else k): gc[k] for k in SAMPLING_KEYS if gc.get(k) is not None}
    if out:
        logger.info("Default sampling parameters have been overridden by the model's Hugging Face generation "
                    "config recommended from the model creator (%s); --generation-config vllm ignores them", out)
    return out


def load_chat_template(value: str) -> str:
    """--chat-template: inline when it holds Jinja syntax, else a file to read (vLLM's rule)."""
    if any(c in value for c in "{}\n"):
        return value
    try:
        return Path(value).read_text()
    except OSError as e:
        raise ConfigError(f"--chat-template {value}: looks like a file path, but it cannot be opened "
                          f"({e.strerror})") from None
