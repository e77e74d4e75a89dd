"""Attention over a paged KV cache: the per-step metadata and the attention op.

The KV cache of one layer is a pair of zero-initialised tensors [num_blocks + 1,
block_size, kv_heads, head_dim]; a token's slot is ``block_id * block_size + offset``.
The last block pads block tables. Keys are gathered a whole block at a time, so the
unwritten tail of a last block is read too (masked out, and finite, never NaN). The model runner orders each batch decodes first (one query
token each, attended in one batched call), then prefill chunks (one call each, causal
within the chunk over the whole cached prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from epplat.core.host_copy import to_device
from epplat.core.ops import TORCH, Kernels


@dataclass
class PrefillChunk:
    q_start: int
    q_end: int
    context_len: int
    block_table: torch.Tensor        # [num_blocks] blocks holding this sequence's keys
    mask: Optional[torch.Tensor]     # [q_len, context_len] bool, None when purely causal


@dataclass
class AttnMetadata:
    slot_mapping: torch.Tensor       # [T] where each new token's K/V is written
    num_decodes: int = 0
    decode_tables: Optional[torch.Tensor] = None  # [B, max_blocks], padded with the zero block
    decode_mask: Optional[torch.Tensor] = None    # [B, 1, 1, max_blocks * block_size] True where valid
    decode_lens: Optional[torch.Tensor] = None    # [B] context lengths
    prefills: list[PrefillChunk] = field(default_factory=list)


def build_attn_metadata(seqs, block_size: int, device, pad_block: int, kernels: Kernels = TORCH) -> AttnMetadata:
    """seqs: list of (context_len, q_len, block_table) in batch order, decodes first. The decode mask
    is built here only for the torch decode attention (a decode kernel takes the lengths)."""
    slot_mapping, prefills = [], []
    dec_lens, dec_tables = [], []
    q_start = 0
    for ctx_len, q_len, table in seqs:
        slot_mapping.extend(table[p // block_size] * block_size + p % block_size
                            for p in range(ctx_len - q_len, ctx_len))
        nblocks = -(-ctx_len // block_size)
        if q_len == 1 and not prefills:
            dec_lens.append(ctx_len)
            dec_tables.append(table[:nblocks])
        else:
            mask = None
            if ctx_len != q_len:
                qpos = torch.arange(ctx_len - q_len, ctx_len, device=device).unsqueeze(1)
                mask = torch.arange(ctx_len, device=device).unsqueeze(0) <= qpos
            prefills.append(PrefillChunk(q_start, q_start + q_len, ctx_len,
                                         to_device(table[:nblocks], torch.long, device), mask))
        q_start += q_len
    meta = AttnMetadata(to_device(slot_mapping, torch.long, device),
                        num_decodes=len(dec_lens), prefills=prefills)
    if dec_lens:
        width = max(len(t) for t in dec_tables)
        padded = [t + [pad_block] * (width - len(t)) for t in dec_tables]
        meta.decode_tables = to_device(padded, torch.long, device)
        lens = to_device(dec_lens, torch.long, device)
        meta.decode_lens = lens
        if kernels.decode_attention is None:
            meta.decode_mask = (torch.arange(width * block_size, device=device)[None, :] < lens[:, None])[:, None, None]
    return meta


def paged_attention(q, k, v, kv_cache, meta: AttnMetadata, scale: float, kernels: Kernels = TORCH,
                    written: bool = False) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, KVH, D]; writes k/v into the cache (unless ``written``: a fused kernel before
    did) and returns [T, H, D]."""
    k_cache, v_cache = kv_cache
    kvh, d = k.shape[1], k.shape[2]
    write = kernels.kv_write
    if not written and (write is None or not write(k, v, k_cache, v_cache, meta.slot_mapping)):
        k_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    gqa = q.shape[1] != kvh
    b = meta.num_decodes
    kernel = kernels.decode_attention
    done = kernel(q[:b], k_cache, v_cache, meta.decode_tables, meta.decode_lens, scale) if b and kernel else None
    if done is not None:
        out[:b] = done
    elif b:
        if meta.decode_mask is None:
            span = torch.arange(meta.decode_tables.shape[1] * k_cache.shape[1], device=q.device)
            meta.decode_mask = (span[None, :] < meta.decode_lens[:, None])[:, None, None]
        flat = meta.decode_tables.view(-1)   # index_select copies whole blocks; [] indexing is ~6x slower
        keys = k_cache.index_select(0, flat).view(b, -1, kvh, d).transpose(1, 2)   # [B, KVH, L, D]
        vals = v_cache.index_select(0, flat).view(b, -1, kvh, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q[:b].unsqueeze(2), keys, vals, attn_mask=meta.decode_mask,
                                           scale=scale, enable_gqa=gqa)
        out[:b] = o.squeeze(2)
    prefill = kernels.prefill_attention
    for p in meta.prefills:
        if p.context_len == p.q_end - p.q_start:     # nothing cached before this chunk: its own keys
            keys, vals = k[p.q_start:p.q_end], v[p.q_start:p.q_end]
        else:
            keys = k_cache.index_select(0, p.block_table).view(-1, kvh, d)[: p.context_len]
            vals = v_cache.index_select(0, p.block_table).view(-1, kvh, d)[: p.context_len]
        qp = q[p.q_start:p.q_end]
        o = prefill(qp, keys, vals, p.mask, scale) if prefill is not None else None
        if o is None:
            o = F.scaled_dot_product_attention(qp.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                               vals.transpose(0, 1)[None], attn_mask=p.mask,
                                               is_causal=p.mask is None, scale=scale, enable_gqa=gqa)[0].transpose(0, 1)
        out[p.q_start:p.q_end] = o
    return out
