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
    _mask: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def fresh(self) -> bool:
        """Nothing cached before the chunk: its keys are its own."""
        return self.context_len == self.q_end - self.q_start

    @property
    def mask(self) -> Optional[torch.Tensor]:
        """[q_len, context_len] bool (query i sees keys up to its position), None when purely causal; made
        on first use, so a step whose attention takes the chunk descriptors builds none."""
        if self._mask is None and not self.fresh:
            dev = self.block_table.device
            qpos = torch.arange(self.context_len - (self.q_end - self.q_start), self.context_len, device=dev)
            self._mask = torch.arange(self.context_len, device=dev).unsqueeze(0) <= qpos.unsqueeze(1)
        return self._mask


@dataclass
class AttnMetadata:
    slot_mapping: torch.Tensor       # [T] where each new token's K/V is written
    num_decodes: int = 0
    decode_tables: Optional[torch.Tensor] = None  # [B, max_blocks], padded with the zero block
    decode_mask: Optional[torch.Tensor] = None    # [B, 1, 1, max_blocks * block_size] True where valid
    decode_lens: Optional[torch.Tensor] = None    # [B] context lengths
    prefills: list[PrefillChunk] = field(default_factory=list)
    # the prefill chunks for a kernel that takes them all in one launch (prefill_attention):
    prefill_desc: Optional[torch.Tensor] = None   # [C, 4] int64: q_start, q_len, context_len, offset in prefill_tables
    prefill_tables: Optional[torch.Tensor] = None  # [sum of the chunks' blocks] int64, the chunks' tables one after another
    max_prefill_len: int = 0                      # the longest chunk's q_len


def build_attn_metadata(seqs, block_size: int, device, pad_block: int, kernels: Kernels = TORCH) -> AttnMetadata:
    """seqs: list of (context_len, q_len, block_table) in batch order, decodes first. Every index tensor of
    the step comes from one host-to-device copy (slots, decode tables and lengths, the prefill chunks'
    descriptors and tables: views of one int64 buffer, each from a 16-byte boundary, since Triton compiles
    a kernel again for a pointer off it). The decode mask is built here only for the torch decode
    attention (a decode kernel takes the lengths)."""
    slots, desc, ptables = [], [], []
    dec_lens, dec_tables = [], []
    q_start = 0
    for ctx_len, q_len, table in seqs:
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(ctx_len - q_len, ctx_len))
        nblocks = -(-ctx_len // block_size)
        if q_len == 1 and not desc:
            dec_lens.append(ctx_len)
            dec_tables.append(table[:nblocks])
        else:
            desc.append((q_start, q_len, ctx_len, len(ptables)))
            ptables.extend(table[:nblocks])
        q_start += q_len
    width = max((len(t) for t in dec_tables), default=0)
    sections = [slots, [x for t in dec_tables for x in (*t, *[pad_block] * (width - len(t)))], dec_lens,
                [x for d in desc for x in d], ptables]
    flat, starts = [], []
    for sec in sections:       # each from a 16-byte boundary: kernels specialise on their pointers' alignment
        flat.extend([0] * (len(flat) & 1))
        starts.append(len(flat))
        flat.extend(sec)
    buf = to_device(flat, torch.long, device)
    t, b, c = len(slots), len(dec_lens), len(desc)
    meta = AttnMetadata(buf[:t], num_decodes=b)
    if b:
        meta.decode_tables = buf[starts[1]:starts[1] + b * width].view(b, width)
        meta.decode_lens = lens = buf[starts[2]:starts[2] + b]
        if kernels.decode_attention is None:
            span = torch.arange(width * block_size, device=device)
            meta.decode_mask = (span[None, :] < lens[:, None])[:, None, None]
    if c:
        meta.prefill_desc = buf[starts[3]:starts[3] + 4 * c].view(c, 4)
        meta.prefill_tables = tables = buf[starts[4]:starts[4] + len(ptables)]
        meta.max_prefill_len = max(d[1] for d in desc)
        meta.prefills = [PrefillChunk(s, s + q, ctx, tables[off:off + -(-ctx // block_size)])
                         for s, q, ctx, off in desc]
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
    if meta.prefills and prefill is not None and prefill(q, k_cache, v_cache, meta, scale, out):
        return out
    for p in meta.prefills:
        if p.fresh:
            keys, vals = k[p.q_start:p.q_end], v[p.q_start:p.q_end]
        else:
            keys = k_cache.index_select(0, p.block_table).view(-1, kvh, d)[: p.context_len]
            vals = v_cache.index_select(0, p.block_table).view(-1, kvh, d)[: p.context_len]
        qp = q[p.q_start:p.q_end]
        o = F.scaled_dot_product_attention(qp.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                           vals.transpose(0, 1)[None], attn_mask=p.mask,
                                           is_causal=p.mask is None, scale=scale, enable_gqa=gqa)[0].transpose(0, 1)
        out[p.q_start:p.q_end] = o
    return out
