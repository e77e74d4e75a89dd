"""Small building blocks shared by the architectures: RMSNorm and rotary embedding.

Each takes the platform's :class:`~epplat.core.ops.Kernels` record and runs its kernel
where the record has one that takes the input; the torch code here is the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from epplat.core.ops import TORCH, Kernels


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as Hugging Face's Llama-family models do."""

    def __init__(self, dim: int, eps: float, dtype=torch.float32, kernels: Kernels = TORCH):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernels.rms_norm
        out = kernel(x, self.weight, self.eps) if kernel is not None else None
        if out is not None:
            return out
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding with a precomputed float32 cos/sin table."""

    def __init__(self, head_dim: int, max_position: int, theta: float, kernels: Kernels = TORCH):
        super().__init__()
        self.kernels = kernels
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, heads, d], k: [T, kv_heads, d]; returns both rotated."""
        kernel = self.kernels.rope
        out = kernel(positions, q, k, self.cos, self.sin) if kernel is not None else None
        if out is not None:
            return out
        cos = self.cos.index_select(0, positions).to(q.dtype).unsqueeze(1)
        sin = self.sin.index_select(0, positions).to(q.dtype).unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
