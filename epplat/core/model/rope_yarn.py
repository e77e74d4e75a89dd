"""DeepSeek's rotary embedding: YaRN frequency scaling with its mscale, pairs interleaved.

DeepSeek checkpoints rotate adjacent pairs (x0, x1), (x2, x3), ... of the rotary part of
q and k (``rope_interleave``, the default; V2 does the same with complex numbers). The
output puts the rotated even lanes first, then the odd lanes, as transformers' DeepseekV3
does: q and k get the same permutation, so their dot products are unchanged, and the
rotary key is cached in that layout. With ``rope_interleave: false`` it is the
Neox-style rotate-half of the other architectures.

The YaRN tables follow transformers' ``_compute_yarn_parameters``; the attention factor
(mscale / mscale_all_dim) multiplies cos and sin, and :func:`softmax_scale` gives the
matching attention scale, ``qk_head_dim^-0.5 * yarn_mscale(factor, mscale_all_dim)^2``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_type(scaling: Optional[dict]) -> str:
    if not scaling:
        return "default"
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ("default", "yarn"):
        raise ValueError(f"rope type {kind!r} is not supported for DeepSeek (default or yarn)")
    return kind


def softmax_scale(qk_head_dim: int, scaling: Optional[dict]) -> float:
    scale = qk_head_dim ** -0.5
    if rope_type(scaling) == "yarn" and scaling.get("mscale_all_dim"):
        m = yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
        scale *= m * m
    return scale


def inv_freq_and_factor(dim: int, theta: float, max_position: int, scaling: Optional[dict]):
    """(inv_freq [dim/2], attention factor) for the default or YaRN rotary."""
    base = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope_type(scaling) == "default":
        return 1.0 / base, 1.0
    factor = scaling.get("factor")
    original = scaling["original_max_position_embeddings"]
    if factor is None:
        factor = max_position / original
    factor = float(factor)
    attn = scaling.get("attention_factor")
    if attn is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(fast), correction_dim(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    inv = (1.0 / (factor * base)) * (1 - extrapolate) + (1.0 / base) * extrapolate
    return inv, float(attn)


class DeepseekRotary(nn.Module):
    """cos/sin tables [max_position, dim/2] (float32, attention factor applied) and their application."""

    def __init__(self, dim: int, max_position: int, theta: float, scaling: Optional[dict], interleave: bool = True):
        super().__init__()
        inv, attn = inv_freq_and_factor(dim, theta, max_position, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv)
        self.register_buffer("cos", freqs.cos() * attn, persistent=False)
        self.register_buffer("sin", freqs.sin() * attn, persistent=False)
        self.interleave = interleave

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, dim] -> rotated (even lanes first when interleaved)."""
        cos = self.cos.index_select(0, positions).to(x.dtype).unsqueeze(1)
        sin = self.sin.index_select(0, positions).to(x.dtype).unsqueeze(1)
        # interleaved pairs (x0, x1), (x2, x3)... or Neox halves; the same rotation either way
        x1, x2 = (x[..., 0::2], x[..., 1::2]) if self.interleave else x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
