"""Small building blocks shared by the architectures: RMSNorm, rotary embedding, activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# device type -> fused kernel taking the arguments of the torch code below and returning its
# result, or None for inputs it does not take; platforms register theirs (cuda: Triton)
NORM_KERNELS: dict = {}
ROPE_KERNELS: dict = {}
LINEAR_KERNELS: dict = {}


def linear(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """F.linear, or the platform's kernel for it where one is registered and takes the input."""
    kernel = LINEAR_KERNELS.get(x.device.type)
    out = kernel(x, w, bias) if kernel else None
    return F.linear(x, w, bias) if out is None else out


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as Hugging Face's Llama-family models do."""

    def __init__(self, dim: int, eps: float, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = NORM_KERNELS.get(x.device.type)
        out = kernel(x, self.weight, self.eps) if kernel else None
        if out is not None:
            return out
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding with a precomputed float32 cos/sin table."""

    def __init__(self, head_dim: int, max_position: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, heads, d], k: [T, kv_heads, d]; returns both rotated."""
        kernel = ROPE_KERNELS.get(q.device.type)
        out = kernel(positions, q, k, self.cos, self.sin) if kernel else None
        if out is not None:
            return out
        cos = self.cos.index_select(0, positions).to(q.dtype).unsqueeze(1)
        sin = self.sin.index_select(0, positions).to(q.dtype).unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


def gated_act(gate_up: torch.Tensor, act) -> torch.Tensor:
    """act(gate) * up for a fused [.., 2I] gate_up tensor."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up
