"""DeepSeek-V3's fp8 checkpoint layout: block quantization arithmetic and the checkpoint's fp8 tensors.

Facts of the layout (DeepSeek-V3's README_WEIGHTS.md): ``config.json`` carries
``quantization_config`` ``{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
"dynamic", "weight_block_size": [128, 128]}``; every quantized linear ``X`` has ``X.weight``
float8_e4m3fn [out, in] and ``X.weight_scale_inv`` float32 [ceil(out/128), ceil(in/128)], and
a 128x128 block dequantizes as ``block * scale_inv`` (a block cut short at the edge is scaled as
if zero-padded). DeepSeek-V3 quantizes every linear of the attention (q_proj or q_a/q_b_proj,
kv_a_proj_with_mqa, kv_b_proj, o_proj), of the dense MLPs and of the shared and routed experts;
embeddings, norms (q_a_layernorm and kv_a_layernorm too), the router gate, lm_head and the MTP
layer's eh_proj and shared_head stay bf16.

Shared by ``epplat make-model --fp8``, the cpu platform (which dequantizes at load) and the
cuda one (which serves the fp8 tensors).
"""

from __future__ import annotations

import json
import math
import re

import torch

FP8_MAX = 448.0
SCALE_SUFFIX = ".weight_scale_inv"

# the checkpoint tensors DeepSeek-V3 stores in fp8 (names as written on disk)
DEEPSEEK_FP8 = re.compile(r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                          r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate|up|down)_proj)\.weight$")


def config_for(block: int = 128) -> dict:
    """The ``quantization_config`` DeepSeek-V3's config.json carries."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [block, block]}


def block_size(qc: dict, who: str = "--quantization fp8") -> int:
    """The block edge of a checkpoint's ``quantization_config``; ValueError (one line) for what the
    fp8 path does not serve: another method or format, static activations, non-square blocks."""
    if qc.get("quant_method") != "fp8":
        raise ValueError(f"{who}: the checkpoint is quantized with {qc.get('quant_method')!r}, not fp8")
    if qc.get("fmt", "e4m3") != "e4m3" or qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"{who} serves e4m3 weights with dynamic activation scales; the checkpoint has fmt "
                         f"{qc.get('fmt')!r}, activation_scheme {qc.get('activation_scheme')!r}")
    bs = list(qc.get("weight_block_size") or [])
    if len(bs) != 2 or bs[0] != bs[1] or not isinstance(bs[0], int) or bs[0] <= 0:
        raise ValueError(f"{who} serves square weight blocks; the checkpoint has weight_block_size "
                         f"{qc.get('weight_block_size')}")
    return bs[0]


def scaled_tensors(model_dir: str) -> dict[str, list[int]]:
    """{weight name as written: its shape} of every tensor the checkpoint has a ``weight_scale_inv`` for
    (read from the safetensors headers, no tensor data)."""
    from epplat.core.model.loader import checkpoint_files
    headers = {}
    for path in checkpoint_files(model_dir):
        with open(path, "rb") as f:
            headers.update(json.loads(f.read(int.from_bytes(f.read(8), "little"))))
    return {k.removesuffix("_scale_inv"): headers[k.removesuffix("_scale_inv")]["shape"]
            for k in headers if k.endswith(SCALE_SUFFIX) and k.removesuffix("_scale_inv") in headers}


def _padded_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """[..., O, I] -> [..., O/b, b, I/b, b] float32, zero-padded to whole blocks."""
    *lead, o, i = w.shape
    po, pi = -o % block, -i % block
    w = torch.nn.functional.pad(w.float(), (0, pi, 0, po))
    return w.reshape(*lead, (o + po) // block, block, (i + pi) // block, block)


def quantize_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., O, I] -> (float8_e4m3fn [..., O, I], float32 scale_inv [..., ceil(O/b), ceil(I/b)]), one scale
    per block (amax / 448), w ~= q * scale_inv."""
    *lead, o, i = w.shape
    blocks = _padded_blocks(w, block)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp_min(1e-12) / FP8_MAX
    q = (blocks / scale[..., :, None, :, None]).to(torch.float8_e4m3fn)
    q = q.reshape(*lead, blocks.shape[-4] * block, blocks.shape[-2] * block)[..., :o, :i]
    return q.contiguous(), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = 128, dtype=torch.float32) -> torch.Tensor:
    """q * scale_inv per block, in float32, rounded once to ``dtype``."""
    *lead, o, i = q.shape
    if list(scale.shape[-2:]) != [math.ceil(o / block), math.ceil(i / block)]:
        raise ValueError(f"weight_scale_inv {list(scale.shape)} does not fit a {list(q.shape)} weight in "
                         f"{block}x{block} blocks")
    blocks = _padded_blocks(q, block) * scale.float()[..., :, None, :, None]
    return blocks.reshape(*lead, blocks.shape[-4] * block, blocks.shape[-2] * block)[..., :o, :i].to(dtype)


def expand_scale(scale: torch.Tensor, shape, block: int = 128) -> torch.Tensor:
    """Each block's scale_inv repeated over its block, cut to the weight's ``shape``: the scale per element."""
    return scale.float().repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :shape[-2], :shape[-1]]
