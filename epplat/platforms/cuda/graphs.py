"""CUDA graphs for decode steps: one graph per batch size, replayed with the step's tokens,
positions, KV slots and block tables copied into static buffers. Prefill and mixed
steps, and batches above the largest captured size, run eagerly."""

from __future__ import annotations

import bisect
import logging

import torch

from epplat.core.engine.graph import GraphRunner
from epplat.core.model.attention import AttnMetadata

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = [1, 2, 4, 8] + list(range(16, 257, 16))


class CudaGraphRunner(GraphRunner):
    captures = True

    def __init__(self, model, device):
        super().__init__(model, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.sizes: list[int] = []

    def capture(self, batch_sizes, max_blocks_per_seq: int, pad_block: int, scratch_slot: int) -> None:
        sizes = sorted(batch_sizes or DEFAULT_BATCH_SIZES)
        g_max, dev = sizes[-1], self.device
        self.ids = torch.zeros(g_max, dtype=torch.long, device=dev)
        self.pos = torch.zeros(g_max, dtype=torch.long, device=dev)
        self.slots = torch.full((g_max,), scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.full((g_max, max_blocks_per_seq), pad_block, dtype=torch.int32, device=dev)
        self.lens = torch.ones(g_max, dtype=torch.int32, device=dev)
        self.scratch_slot, self.pad_block = scratch_slot, pad_block
        self.out = {}
        pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(dev)
        with torch.inference_mode():
            for g in reversed(sizes):          # largest first, so smaller graphs reuse its pool
                meta = self._meta(g)
                for _ in range(2):             # warm up: Triton compiles, cuBLAS picks kernels
                    self.model(self.ids[:g], self.pos[:g], meta)
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.out[g] = self.model(self.ids[:g], self.pos[:g], meta)
                self.graphs[g] = graph
        self.sizes = sizes
        logger.info("Captured CUDA graphs for decode batch sizes %s", sizes)

    def _meta(self, g: int) -> AttnMetadata:
        return AttnMetadata(self.slots[:g], num_decodes=g, decode_tables=self.tables[:g], decode_lens=self.lens[:g])

    def forward(self, input_ids, positions, meta: AttnMetadata):
        b = input_ids.shape[0]
        if meta.prefills or meta.num_decodes != b or not self.sizes or b > self.sizes[-1] or b == 0:
            return self.model(input_ids, positions, meta)
        g = self.sizes[bisect.bisect_left(self.sizes, b)]
        w = meta.decode_tables.shape[1]
        self.ids[:b].copy_(input_ids)
        self.pos[:b].copy_(positions)
        self.slots[:b].copy_(meta.slot_mapping)
        self.slots[b:g].fill_(self.scratch_slot)
        self.tables[:b, :w].copy_(meta.decode_tables)
        self.lens[:b].copy_(meta.decode_lens)
        self.lens[b:g].fill_(1)
        self.tables[b:g, 0].fill_(self.pad_block)
        self.graphs[g].replay()
        return self.out[g][:b]
