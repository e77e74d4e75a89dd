"""An example third-party epplat platform, ``--platform einsum``: the CPU, with kernels of its own.

It shows the whole platform contract from outside epplat: a ``Platform`` subclass (device,
collectives, KV cache budget) registered through the ``epplat_platforms`` hook, and the
``Kernels`` record it hands the engine. Its kernels are plain torch written another way than
epplat's reference code: RMSNorm through ``torch.nn.functional.rms_norm``, routing that takes
the top-k of the logits (softmax keeps their order) and normalises only the chosen ones, and
MoE experts computed densely with ``einsum`` (every local expert on every token, weighted by a
[tokens, experts] routing matrix: no gather, no sort, no host sync). Each kernel counts its
calls in ``CALLS`` and logs its first one, so a test can see that the engine ran them.
Through the ``epplat_cli_commands`` hook it also adds ``epplat einsum-kernels``, which lists them.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Optional

import torch
import torch.nn.functional as F

from epplat.core.ops import Kernels
from epplat.hookspecs import Registration, hookimpl
from epplat.platforms.interface import Platform

logger = logging.getLogger("epplat_example_platform")
CALLS: Counter = Counter()


def _count(name: str) -> None:
    CALLS[name] += 1
    if CALLS[name] == 1:
        logger.info("einsum platform: the %s kernel runs", name)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """epplat's RMSNorm: float32 math, scaled after the cast back (as Hugging Face's models)."""
    _count("rms_norm")
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def route(logits: torch.Tensor, top_k: int, renormalize: bool, dtype):
    """Top-k softmax routing: softmax keeps the logits' order, so the top-k of the logits are the chosen
    experts; their weights are the softmax over all experts (renormalised: over the chosen ones)."""
    _count("route")
    logits = logits.float()
    top, ids = torch.topk(logits, top_k, dim=-1)
    if renormalize:
        weights = torch.softmax(top, dim=-1)
    else:
        weights = torch.exp(top - torch.logsumexp(logits, dim=-1, keepdim=True))
    return weights.to(dtype), ids


def dense_experts(x, topk_ids, topk_weights, w13, w2, act) -> Optional[torch.Tensor]:
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]) as einsums over every local expert (ids < 0: another rank's)."""
    _count("experts")
    experts = w13.shape[0]
    valid = topk_ids >= 0
    onehot = F.one_hot(torch.where(valid, topk_ids, 0), experts).to(x.dtype)       # [T, K, E]
    mix = torch.einsum("tke,tk->te", onehot, torch.where(valid, topk_weights, 0).to(x.dtype))
    gate_up = torch.einsum("th,ehi->eti", x, w13)                                  # [E, T, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch.einsum("eti,eih->eth", act(gate) * up, w2)                           # [E, T, H]
    return torch.einsum("eth,te->th", y, mix)


class EinsumPlatform(Platform):
    """The CPU with gloo collectives; the KV cache takes --kv-cache-memory-bytes (default 512 MiB)."""

    name = "einsum"
    device_type = "cpu"
    dist_backend = "gloo"

    def __init__(self):
        self.kernels = Kernels(rms_norm=rms_norm, route=route, experts=dense_experts)

    def kv_cache_bytes(self, cache_cfg, weight_bytes, device, profile=None) -> int:
        return cache_cfg.kv_cache_memory_bytes or 512 << 20

    def log_prefix(self) -> str:
        return "CPU (einsum)"


@hookimpl
def epplat_platforms():
    return [Registration("einsum", lambda: EinsumPlatform,
                         help="example third-party platform: CPU, einsum experts (epplat-example-platform)")]


def _list_kernels(args) -> int:
    for name, fn in EinsumPlatform().kernels.fields().items():
        print(f"{name:<12} {fn.__module__}.{fn.__qualname__}")
    return 0


@hookimpl
def epplat_cli_commands(subparsers):
    p = subparsers.add_parser("einsum-kernels", help="the einsum platform's kernels (epplat-example-platform)")
    p.set_defaults(func=_list_kernels)
