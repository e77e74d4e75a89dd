"""CUDA graphs for decode steps: one graph per batch size, replayed with the step's tokens,
positions, KV slots and block tables copied into static buffers. Prefill and mixed
steps, and batches above the largest captured size, run eagerly."""

from __future__ import annotations

import logging

import torch

from epplat.core.engine.graph import StaticDecodeRunner

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = [1, 2, 4, 8] + list(range(16, 257, 16))


class CudaGraphRunner(StaticDecodeRunner):
    def capture(self, batch_sizes, max_blocks_per_seq: int, pad_block: int, scratch_slot: int) -> None:
        sizes = sorted(batch_sizes or DEFAULT_BATCH_SIZES)
        dev = self.device
        self._allocate(sizes[-1], max_blocks_per_seq, pad_block, scratch_slot)
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

    def forward(self, input_ids, positions, meta):
        g = self._stage(input_ids, positions, meta)
        if g is None:
            return self.model(input_ids, positions, meta)
        self.graphs[g].replay()
        return self.out[g][:input_ids.shape[0]]
