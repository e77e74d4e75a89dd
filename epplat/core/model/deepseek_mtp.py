"""DeepSeek-V3's multi-token-prediction (MTP) layer, the draft model of ``deepseek_mtp``.

The checkpoint stores it as layer ``num_hidden_layers`` (layer 61 of V3): ``enorm``,
``hnorm``, ``eh_proj``, a whole decoder layer (MLA + MoE), ``shared_head.norm`` /
``shared_head.head`` and its own ``embed_tokens``. At position p it combines the target
model's final hidden state h_p with the embedding of token p+1 and predicts token p+2
(vLLM's formulation: inputs shifted one to the left; the embedding at position 0 is zero):

    x = eh_proj([enorm(embed(token_{p+1})), hnorm(h_p)]);  h' = layer(x);  logits = head(norm(h'))

Its KV cache has the main model's block layout, so it shares the requests' block tables
and slot mapping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epplat.core.model.decoder import _param
from epplat.core.model.layers import RMSNorm
from epplat.core.ops import TORCH, Kernels, linear


class DeepseekMTP(nn.Module):
    def __init__(self, cfg, layer: nn.Module, dtype, kernels: Kernels = TORCH):
        super().__init__()
        h = cfg.hidden_size
        self.kernels = kernels
        self.embed_tokens = _param(cfg.vocab_size, h, dtype=dtype)
        self.enorm = RMSNorm(h, cfg.rms_norm_eps, dtype, kernels)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps, dtype, kernels)
        self.eh_proj = _param(h, 2 * h, dtype=dtype)
        self.layer = layer
        self.norm = RMSNorm(h, cfg.rms_norm_eps, dtype, kernels)      # shared_head.norm
        self.head = _param(cfg.vocab_size, h, dtype=dtype)    # shared_head.head

    _OWN = {"embed_tokens": "embed_tokens", "enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj",
            "shared_head.norm": "norm", "shared_head.head": "head"}

    def own_names(self) -> set[str]:
        return set(self._OWN)

    def load_own(self, name: str, t: torch.Tensor) -> bool:
        """Copy one of the MTP layer's own tensors (not its decoder layer's); False if it is none of them."""
        attr = self._OWN.get(name)
        if attr is None:
            return False
        dst = getattr(self, attr)
        (dst.weight if isinstance(dst, RMSNorm) else dst).data.copy_(t)
        return True

    def forward(self, next_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor, meta) -> torch.Tensor:
        """next_ids: token p+1 for each position p; hidden: the target's final hidden states at p."""
        emb = F.embedding(next_ids, self.embed_tokens)
        emb = torch.where((positions == 0)[:, None], torch.zeros_like(emb), emb)
        x = linear(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1), self.eh_proj, None, self.kernels)
        return self.layer(x, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(self.norm(hidden), self.head, None, self.kernels)
