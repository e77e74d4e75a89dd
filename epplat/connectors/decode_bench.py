"""DecodeBenchConnector (vLLM's): fills the KV cache of every new request's prompt with values drawn
from N(fill_mean, fill_std) instead of computing its prefill, so decode can be measured without a
prefill instance. Only the prompt's last token is computed. Outputs are meaningless.

    --kv-transfer-config '{"kv_connector":"DecodeBenchConnector","kv_role":"kv_both",
                           "kv_connector_extra_config":{"fill_mean":0.015,"fill_std":0.0}}'
"""

from __future__ import annotations

import torch

from epplat.config import ConfigError
from epplat.connectors.base import KVConnectorBase, KVConnectorMetadata


class DecodeBenchMetadata(KVConnectorMetadata):
    fills: list[tuple[list[int], int, int]] = []    # (block table, first position, end position) to fill


class DecodeBenchConnector(KVConnectorBase):
    metadata_type = DecodeBenchMetadata

    def __init__(self, config, engine, role, dp_rank: int = 0, tp_rank: int = 0):
        super().__init__(config, engine, role, dp_rank, tp_rank)
        extra = config.kv_connector_extra_config
        try:
            self.mean = float(extra.get("fill_mean", 0.015))
            self.std = float(extra.get("fill_std", 0.0))
        except (TypeError, ValueError):
            raise ConfigError("DecodeBenchConnector: fill_mean and fill_std must be numbers") from None
        if self.std < 0:
            raise ConfigError("DecodeBenchConnector: fill_std must be >= 0")
        self.pending: list[tuple[list[int], int, int]] = []
        self.kv_caches: list[tuple] = []

    def get_num_new_matched_tokens(self, req, num_computed_tokens: int) -> tuple[int, bool]:
        return max(0, req.num_tokens - 1 - num_computed_tokens), False

    def update_state_after_alloc(self, req, num_external_tokens: int) -> None:
        if num_external_tokens:
            start = req.num_computed
            self.pending.append((list(req.block_table), start, start + num_external_tokens))

    def build_connector_meta(self) -> DecodeBenchMetadata:
        meta, self.pending = DecodeBenchMetadata(self.pending), []
        return meta

    def register_kv_caches(self, kv_caches: list[tuple]) -> None:
        self.kv_caches = kv_caches

    def start_load_kv(self, meta: DecodeBenchMetadata) -> None:
        bs = self.block_size
        for table, start, end in meta.fills:
            pos = torch.arange(start, end)
            blocks = torch.tensor(table)[pos // bs]
            offsets = pos % bs
            for k, v in self.kv_caches:
                for cache in (k, v):
                    shape = (len(pos), *cache.shape[2:])
                    fill = torch.full(shape, self.mean) if self.std == 0 else torch.normal(self.mean, self.std, shape)
                    cache[blocks.to(cache.device), offsets.to(cache.device)] = fill.to(cache.device, cache.dtype)
