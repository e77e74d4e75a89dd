"""The built-in demo model: a small random Qwen3-MoE made on first use and cached."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from epplat.config import cache_dir

DEMO_VERSION = "qwen3-moe-demo-v2"   # bump when make_model or the tokenizer changes output
DEMO_SHAPE = dict(layers=4, hidden=256, experts=16, top_k=4, heads=4, kv_heads=2, head_dim=64,
                  moe_intermediate=256, vocab_size=2048, seed=0, dtype="float32")


def demo_model_path() -> Path:
    """The demo checkpoint directory, created atomically (temp dir + rename) if missing."""
    from epplat.tools.make_model import make_model
    final = cache_dir() / DEMO_VERSION
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=final.parent))
    try:
        make_model("qwen3_moe", tmp, **DEMO_SHAPE)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
