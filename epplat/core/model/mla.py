"""Multi-head latent attention (DeepSeek-V2/V3's MLA) over a paged latent cache.

The KV cache of an MLA layer is one tensor [num_blocks + 2, block_size, 1, kv_lora_rank +
qk_rope_head_dim]: per token the normalised latent and the rotary key, shared by every
head (576 values for V3's shapes), instead of keys and values per head.

- Prefill chunks decompress: the context's latents go through kv_b_proj into per-head
  k_nope and v, the rotary key is broadcast to every head, and ordinary causal attention
  runs with q/k head dim qk_nope + qk_rope and v head dim v_head_dim.
- Decodes absorb: kv_b_proj splits per head into W_UK [dn, r] and W_UV [dv, r]; q_nope @
  W_UK is a query in latent space, attention runs over the cached latents as multi-query
  attention (keys: latent + rotary key, values: the latent), and its output goes through
  W_UV before o_proj.

Heads are split over the TP group (q_b_proj / kv_b_proj rows, o_proj columns); the
down-projections (q_a_proj, kv_a_proj_with_mqa) and the latent cache are replicated.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from epplat.core.distributed.parallel_state import ParallelState
from epplat.core.model.attention import AttnMetadata
from epplat.core.model.decoder import Projections, _param, _tp_all_reduce
from epplat.core.model.layers import RMSNorm
from epplat.core.model.rope_yarn import DeepseekRotary, softmax_scale
from epplat.core.ops import TORCH, Kernels


class MLAttention(Projections):
    def __init__(self, cfg, rope: DeepseekRotary, ps: ParallelState, dtype, kernels: Kernels = TORCH):
        super().__init__()
        t = ps.tp_size                   # the layout splits the heads (epplat.config.check_layout)
        self.ps, self.rope, self.kernels = ps, rope, kernels
        self.h = cfg.num_heads // t
        self.head0 = ps.tp_rank * self.h
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.r, self.qr = cfg.kv_lora_rank, cfg.q_lora_rank
        qk, hidden = self.dn + self.dr, cfg.hidden_size
        if self.qr:
            self.q_a_proj = _param(self.qr, hidden, dtype=dtype)
            self.q_a_layernorm = RMSNorm(self.qr, cfg.rms_norm_eps, dtype, kernels)
            self.q_b_proj = _param(self.h * qk, self.qr, dtype=dtype)
        else:
            self.q_proj = _param(self.h * qk, hidden, dtype=dtype)
        self.kv_a_proj_with_mqa = _param(self.r + self.dr, hidden, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(self.r, cfg.rms_norm_eps, dtype, kernels)
        self.kv_b_proj = _param(self.h * (self.dn + self.dv), self.r, dtype=dtype)
        self.o_proj = _param(hidden, self.h * self.dv, dtype=dtype)
        self.scale = softmax_scale(qk, cfg.rope_scaling)
        self.kv_cache: Optional[tuple] = None
        # kv_b_proj in the model dtype for the absorbed decode, where a quantization method keeps kv_b_proj in
        # a form the per-head batched GEMMs cannot take (fp8 blocks); None: kv_b_proj itself
        self.w_kv_b: Optional[torch.Tensor] = None
        # (first, *deps) -> context manager running the query path on a second stream; set by a graph
        # runner that overlaps it with the latent's projection and cache write (ascend: enable_multistream_mla)
        self.query_side_stream = None

    # --- weights -------------------------------------------------------------------------
    _HEAD_ROWS = ("q_proj", "q_b_proj", "kv_b_proj")

    def weight_names(self) -> set[str]:
        q = {"q_a_proj", "q_a_layernorm", "q_b_proj"} if self.qr else {"q_proj"}
        return q | {"kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"}

    def load(self, name: str, t: torch.Tensor):
        if name not in self.weight_names():
            raise KeyError(name)
        dst = getattr(self, name)
        if isinstance(dst, RMSNorm):
            dst.weight.data.copy_(t)
        elif name in self._HEAD_ROWS:
            per = t.shape[0] // (self.h * self.ps.tp_size)
            dst.data.copy_(t[self.head0 * per:(self.head0 + self.h) * per])
        elif name == "o_proj":
            dst.data.copy_(t[:, self.head0 * self.dv:(self.head0 + self.h) * self.dv])
        else:
            dst.data.copy_(t)

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> list[tuple]:
        return [(num_blocks, block_size, 1, self.r + self.dr)]

    # --- forward -------------------------------------------------------------------------
    def _query(self, x, positions):
        q = (self.project("q_b_proj", self.q_a_layernorm(self.project("q_a_proj", x))) if self.qr
             else self.project("q_proj", x)).view(-1, self.h, self.dn + self.dr)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        return q_nope, self.rope.rotate(positions, q_pe)

    def forward(self, x, positions, meta: AttnMetadata):
        if self.query_side_stream is not None:
            with self.query_side_stream(x):
                q_nope, q_pe = self._query(x, positions)
        else:
            q_nope, q_pe = self._query(x, positions)
        latent, k_pe = self.project("kv_a_proj_with_mqa", x).split([self.r, self.dr], dim=-1)
        k_pe = self.rope.rotate(positions, k_pe.unsqueeze(1)).squeeze(1)
        entry = torch.cat([self.kv_a_layernorm(latent), k_pe], dim=-1)      # [T, r + dr]
        (cache,) = self.kv_cache
        flat = cache.view(-1, self.r + self.dr)
        flat.index_copy_(0, meta.slot_mapping, entry)
        out = x.new_empty(x.shape[0], self.h, self.dv)
        b = meta.num_decodes
        if b:
            out[:b] = self._decode_absorbed(q_nope[:b], q_pe[:b], cache, meta)
        if meta.prefills:
            q = torch.cat([q_nope, q_pe], dim=-1)
        for p in meta.prefills:
            if p.fresh:
                ctx = entry[p.q_start:p.q_end]
            else:
                ctx = cache.index_select(0, p.block_table).view(-1, self.r + self.dr)[: p.context_len]
            out[p.q_start:p.q_end] = self._prefill_decompressed(q[p.q_start:p.q_end], ctx, p.mask)
        return _tp_all_reduce(self.project("o_proj", out.reshape(-1, self.h * self.dv)), self.ps)

    def _w_kv(self):
        w = (self.kv_b_proj if self.w_kv_b is None else self.w_kv_b).view(self.h, self.dn + self.dv, self.r)
        return w[:, : self.dn], w[:, self.dn:]          # W_UK [h, dn, r], W_UV [h, dv, r]

    def _prefill_decompressed(self, q, ctx, mask):
        """q [L, h, dn + dr] over context entries ctx [C, r + dr] -> [L, h, dv]."""
        kv = self.project("kv_b_proj", ctx[:, : self.r]).view(-1, self.h, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k = torch.cat([k_nope, ctx[:, None, self.r:].expand(-1, self.h, -1)], dim=-1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                                           scale=self.scale)
        return o[0].transpose(0, 1)

    def _decode_absorbed(self, q_nope, q_pe, cache, meta: AttnMetadata):
        """One query token per sequence [B, h, ...] over its cached latents -> [B, h, dv]."""
        b = q_nope.shape[0]
        w_uk, w_uv = self._w_kv()
        q_lat = torch.einsum("bhd,hdr->bhr", q_nope, w_uk)
        kernel = self.kernels.mla_decode_attention
        o = (kernel(q_lat, q_pe, cache, meta.decode_tables, meta.decode_lens, self.scale)
             if kernel is not None else None)                                  # [B, h, r]
        if o is not None:
            return torch.einsum("bhr,hvr->bhv", o, w_uv)
        query = torch.cat([q_lat, q_pe], dim=-1).unsqueeze(2)                 # [B, h, 1, r + dr]
        if meta.decode_mask is None:
            span = torch.arange(meta.decode_tables.shape[1] * cache.shape[1], device=q_nope.device)
            meta.decode_mask = (span[None, :] < meta.decode_lens[:, None])[:, None, None]
        keys = cache.index_select(0, meta.decode_tables.view(-1)).view(b, 1, -1, self.r + self.dr)
        o = F.scaled_dot_product_attention(query, keys, keys[..., : self.r], attn_mask=meta.decode_mask,
                                           scale=self.scale, enable_gqa=True)  # [B, h, 1, r]
        return torch.einsum("bhr,hvr->bhv", o.squeeze(2), w_uv)
