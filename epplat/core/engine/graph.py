"""Graph runners: how a model forward is executed (eager, or captured graphs replayed).

Core registers the ``eager`` runner here (every platform has it; ``--enforce-eager`` selects it;
epplat.plugins.registry registers this module itself); platforms register their capturing runners.
"""

from __future__ import annotations

import bisect
from typing import Optional

import torch

from epplat.core.model.attention import AttnMetadata
from epplat.hookspecs import Registration, hookimpl


class GraphRunner:
    """Runs model forwards; capture-capable runners replay decode steps from graphs."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    captures = False
    # replays recorded device kernels (CUDA graphs): a captured step must not synchronise with the host.
    # Runners that compile (torchair) split the graph at host syncs instead.
    replays_kernels = True

    def capture(self, batch_sizes: list[int], max_blocks_per_seq: int, pad_block: int, scratch_slot: int) -> None:
        """Capture decode steps for these batch sizes (no-op for eager). Padded rows write
        their K/V to scratch_slot and read the zero pad_block."""

    def forward(self, input_ids, positions, meta):
        raise NotImplementedError


class EagerRunner(GraphRunner):
    def forward(self, input_ids, positions, meta):
        return self.model(input_ids, positions, meta)


class StaticDecodeRunner(GraphRunner):
    """Base of runners that replay decode steps from per-batch-size graphs over static buffers
    (CUDA graphs, torchair): a decode batch is copied into the buffers and padded to the next
    size, its padding rows writing K/V to the scratch slot and reading the zero pad block."""

    captures = True

    def __init__(self, model, device):
        super().__init__(model, device)
        self.graphs: dict[int, object] = {}
        self.sizes: list[int] = []

    def _allocate(self, g_max: int, max_blocks_per_seq: int, pad_block: int, scratch_slot: int) -> None:
        dev = self.device
        self.ids = torch.zeros(g_max, dtype=torch.long, device=dev)
        self.pos = torch.zeros(g_max, dtype=torch.long, device=dev)
        self.slots = torch.full((g_max,), scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.full((g_max, max_blocks_per_seq), pad_block, dtype=torch.int32, device=dev)
        self.lens = torch.ones(g_max, dtype=torch.int32, device=dev)
        self.scratch_slot, self.pad_block = scratch_slot, pad_block

    def _meta(self, g: int) -> AttnMetadata:
        return AttnMetadata(self.slots[:g], num_decodes=g, decode_tables=self.tables[:g], decode_lens=self.lens[:g])

    def _stage(self, input_ids, positions, meta: AttnMetadata) -> Optional[int]:
        """Copy a pure decode batch into the buffers; the padded size to replay, or None to run
        the step eagerly (prefill or mixed steps, empty batches, batches above the largest size)."""
        b = input_ids.shape[0]
        if meta.prefills or meta.num_decodes != b or not self.sizes or b > self.sizes[-1] or b == 0:
            return None
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
        return g


@hookimpl
def epplat_graph_runners():
    return [Registration("eager", lambda: EagerRunner, help="no graph capture: every step runs eagerly")]
