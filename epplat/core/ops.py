"""The platform contract for compute: the ``Kernels`` record, and the torch ops every layer shares.

A platform hands the engine one :class:`Kernels` record (``Platform.kernels``); the model
runner passes it to the model, and every layer keeps it as ``self.kernels`` and reads its
field at call time. Nothing is keyed by device type and nothing is registered in a module:
two platforms in one process keep two records. Each field is optional: ``None`` runs the torch code of the layer that owns
the op, and a kernel may return ``None`` for inputs it does not take (a shape, a dtype), which
runs the torch code too. The torch implementations are the reference the kernels must match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

Kernel = Optional[Callable]


@dataclass(frozen=True)
class Kernels:
    """Named, optional fast paths; the argument lists are those of the torch code they replace."""

    # (x [T, in], w [out, in], bias | None) -> y [T, out]          torch: F.linear
    linear: Kernel = None
    # (x [.., D], weight [D], eps) -> y                              torch: RMSNorm.forward (float32 math)
    rms_norm: Kernel = None
    # (positions [T], q [T, H, D], k [T, KVH, D], cos, sin) -> (q, k)  torch: RotaryEmbedding.forward (neox)
    rope: Kernel = None
    # (k, v [T, KVH, D], k_cache, v_cache, slot_mapping [T]) -> True when written  torch: index_copy_
    kv_write: Kernel = None
    # (q [B, H, D], k_cache, v_cache, tables [B, blocks], lens [B], scale) -> [B, H, D]  torch: paged SDPA
    decode_attention: Kernel = None
    # (q [T, H, D], k_cache, v_cache (this step's keys written), meta: AttnMetadata, scale, out [T, H, D])
    # -> True once out's rows of every prefill chunk (meta.prefill_desc) are written  torch: SDPA per chunk
    prefill_attention: Kernel = None
    # (router logits [T, E], top_k, renormalize, dtype) -> (weights [T, k], ids [T, k])  torch: FusedMoE.route
    route: Kernel = None
    # (x [R, H], topk_ids [R, K], topk_weights, w13 [E, H, 2I], w2 [E, I, H], act) -> [R, H]
    experts: Kernel = None
    # (x [rows, in], w [E, in, out], offs [E] int32 cumulative rows) -> [rows, out]; None: one matmul per expert
    grouped_mm: Kernel = getattr(torch, "_grouped_mm", None)
    # (layer: DecoderLayer, x, positions, meta) -> x after the whole layer
    decoder_layer: Kernel = None
    # DeepSeek MLA decode over the latent cache (weights absorbed, as vLLM's MLA backends do):
    # (q_latent [B, H, r], q_pe [B, H, dr], cache [blocks, block, 1, r + dr], tables, lens, scale) -> [B, H, r]
    mla_decode_attention: Kernel = None

    # (logits [B, V] float32, temperature: float | [B] host tensor, keys: int | [B] int64 host tensor) -> tokens [B]:
    # one draw a row from softmax(logits / temperature), its noise a function of the row's 64-bit key and
    # the token index alone (an int key k: row i takes k + i)           torch: the sampler's inverse-CDF draw
    sample: Kernel = None
    # (logits [B, V] float32, mask [R, ceil(V / 32)] int32 on the host (bit t % 32 of word t // 32: token t
    # allowed), rows: R row indices) -> True once -inf is written in place where a bit is 0
    #                                        torch: structured_output.ban_disallowed (unpack + masked_fill_)
    apply_bitmask: Kernel = None

    def fields(self) -> dict[str, Callable]:
        """The kernels this record sets (for logs and `epplat plugins`)."""
        return {k: v for k, v in vars(self).items() if v is not None}


TORCH = Kernels()   # every op in torch (the record of a platform that brings no kernel of its own)


def linear(x: torch.Tensor, w: torch.Tensor, bias=None, kernels: Kernels = TORCH) -> torch.Tensor:
    """F.linear, or the record's linear kernel where it takes the input."""
    kernel = kernels.linear
    out = kernel(x, w, bias) if kernel is not None else None
    return F.linear(x, w, bias) if out is None else out


def bf16_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> Optional[torch.Tensor]:
    """torch._grouped_mm for bfloat16 only (what it takes on GPUs and NPUs); None otherwise."""
    return torch._grouped_mm(x, w, offs=offs) if x.dtype == torch.bfloat16 else None


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


def gated_act(gate_up: torch.Tensor, act) -> torch.Tensor:
    """act(gate) * up for a fused [.., 2I] gate_up tensor."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up
