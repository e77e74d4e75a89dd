"""A checkpoint copied with its tensors and config.json rewritten: how tests and benchmarks turn one
checkpoint into another layout (fp8 experts from bf16, a dequantized copy of an fp8 checkpoint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable


def rewrite_checkpoint(src, dst, tensors: Callable, config: Callable[[dict], dict]) -> Path:
    """Copy checkpoint ``src`` to ``dst`` (created): the files other than the weights as they are,
    ``config(config.json's dict)`` as config.json, and one model.safetensors holding
    ``tensors(name, tensor, its shard)`` (a dict of tensors to write) for each tensor, shard by shard."""
    from safetensors.torch import load_file, save_file

    from epplat.core.model.loader import checkpoint_files
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(config(json.loads((src / "config.json").read_text())), indent=2))
    out = {}
    for path in checkpoint_files(str(src)):
        shard = load_file(str(path))
        for k, t in shard.items():
            out.update(tensors(k, t, shard))
    save_file(out, str(dst / "model.safetensors"))
    return dst
