"""Streams a Hugging Face safetensors checkpoint into a model, one tensor at a time.

Only tensors this rank keeps are read (other ranks' experts are skipped without
being loaded), and each is copied into its preallocated parameter straight away,
so the checkpoint is never held in memory twice.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from safetensors import safe_open
from tqdm import tqdm

logger = logging.getLogger(__name__)


def checkpoint_files(model_dir: str) -> list[Path]:
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / f for f in files]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def load_checkpoint(model, model_dir: str, canonical_name, device, show_progress: bool = True, quant=None) -> int:
    """Load every tensor the model wants; returns the bytes read. Unknown or missing tensors raise.
    A quantization method (epplat.core.model.quant) reads the tensors it owns itself."""
    files = checkpoint_files(model_dir)
    loaded, seen = 0, set()
    bar = tqdm(files, desc="Loading safetensors checkpoint shards", unit="shard",
               disable=not show_progress, file=sys.stderr)
    for path in bar:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = canonical_name(key)
                owned = quant is not None and quant.owns(name)
                if name.startswith("rotary_emb") or not (owned or model.wants(name)):
                    continue
                t = f.get_tensor(key)
                try:
                    if (quant.load_weight(model, name, t.to(device)) if owned else model.load_weight(name, t.to(device))):
                        loaded += t.numel() * t.element_size()
                        seen.add(name)
                except (KeyError, IndexError, ValueError) as e:
                    raise ValueError(f"checkpoint tensor {key!r} does not fit the model: {e}") from None
    missing = (model.required_names() | (quant.required_names(model) if quant else set())) - seen
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks {len(missing)} tensors the model needs, "
                         f"e.g. {sorted(missing)[:3]}")
    return loaded
