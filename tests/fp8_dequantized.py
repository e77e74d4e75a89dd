"""The oracle's copy of a DeepSeek-V3-layout fp8 checkpoint: every fp8 weight multiplied out with its
128x128 block scales (float32), the scales and ``quantization_config`` dropped, so transformers (and
an unquantized epplat run) load the very weights the fp8 checkpoint holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def write_dequantized(src, dst, dtype=torch.float32) -> Path:
    from safetensors.torch import load_file, save_file

    from epplat.core.model.fp8_blocks import dequantize_blocks
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    block = cfg.pop("quantization_config")["weight_block_size"][0]
    cfg["torch_dtype"] = cfg["dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    out = {}
    for path in sorted(src.glob("*.safetensors")):
        ts = load_file(str(path))
        for k, t in ts.items():
            if k.endswith(".weight_scale_inv"):
                continue
            scale = ts.get(k + "_scale_inv")
            out[k] = (dequantize_blocks(t, scale, block, dtype) if scale is not None else t.to(dtype)).contiguous()
    save_file(out, str(dst / "model.safetensors"))
    return dst
