"""Attention over a paged KV cache: the per-step metadata and the attention op.

The KV cache of one layer is a pair of tensors [num_blocks * block_size + 1, kv_heads,
head_dim]; a token's slot is ``block_id * block_size + offset``. The last slot stays
zero: padded decode positions read it, so uninitialised memory is never read (the
cache itself is allocated without a memset, which costs seconds for gigabytes). The model runner
orders each batch decodes first (one query token each, attended in one batched
call) and then prefill chunks (one call each, causal within the chunk over the
whole cached prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    q_start: int
    q_end: int
    key_slots: torch.Tensor          # [context_len] slots of every key this chunk sees
    mask: Optional[torch.Tensor]     # [q_len, context_len] bool, None when purely causal


@dataclass
class AttnMetadata:
    slot_mapping: torch.Tensor       # [T] where each new token's K/V is written
    num_decodes: int = 0
    decode_slots: Optional[torch.Tensor] = None   # [B, Lmax] key slots, padded with the zero slot
    decode_mask: Optional[torch.Tensor] = None    # [B, 1, 1, Lmax] True where a key is valid
    prefills: list[PrefillChunk] = field(default_factory=list)


def build_attn_metadata(seqs, block_size: int, device, pad_slot: int) -> AttnMetadata:
    """seqs: list of (context_len, q_len, block_table) in batch order, decodes first."""
    slot_mapping, prefills = [], []
    dec_ctx, dec_tables = [], []
    q_start = 0
    for ctx_len, q_len, table in seqs:
        slots = _slots(table, ctx_len, block_size)
        slot_mapping.extend(slots[ctx_len - q_len:])
        if q_len == 1 and not prefills:
            dec_ctx.append(ctx_len)
            dec_tables.append(slots)
        else:
            mask = None
            if ctx_len != q_len:
                qpos = torch.arange(ctx_len - q_len, ctx_len).unsqueeze(1)
                mask = torch.arange(ctx_len).unsqueeze(0) <= qpos
                mask = mask.to(device)
            prefills.append(PrefillChunk(q_start, q_start + q_len,
                                         torch.tensor(slots, dtype=torch.long, device=device), mask))
        q_start += q_len
    meta = AttnMetadata(torch.tensor(slot_mapping, dtype=torch.long, device=device),
                        num_decodes=len(dec_ctx), prefills=prefills)
    if dec_ctx:
        lmax = max(dec_ctx)
        padded = [s + [pad_slot] * (lmax - len(s)) for s in dec_tables]
        meta.decode_slots = torch.tensor(padded, dtype=torch.long, device=device)
        lens = torch.tensor(dec_ctx, device=device)
        meta.decode_mask = (torch.arange(lmax, device=device)[None, :] < lens[:, None])[:, None, None, :]
    return meta


def _slots(table: list[int], n: int, block_size: int) -> list[int]:
    return [table[i // block_size] * block_size + i % block_size for i in range(n)]


def paged_attention(q, k, v, kv_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, KVH, D]; writes k/v into the cache and returns [T, H, D]."""
    k_cache, v_cache = kv_cache
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    b = meta.num_decodes
    if b:
        keys = k_cache[meta.decode_slots].transpose(1, 2)      # [B, KVH, L, D]
        vals = v_cache[meta.decode_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(q[:b].unsqueeze(2), keys, vals, attn_mask=meta.decode_mask,
                                           scale=scale, enable_gqa=gqa)
        out[:b] = o.squeeze(2)
    for p in meta.prefills:
        keys = k_cache[p.key_slots].transpose(0, 1).unsqueeze(0)  # [1, KVH, L, D]
        vals = v_cache[p.key_slots].transpose(0, 1).unsqueeze(0)
        qp = q[p.q_start:p.q_end].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qp, keys, vals, attn_mask=p.mask, is_causal=p.mask is None,
                                           scale=scale, enable_gqa=gqa)
        out[p.q_start:p.q_end] = o[0].transpose(0, 1)
    return out
