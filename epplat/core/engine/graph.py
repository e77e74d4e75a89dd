"""Graph runners: how a model forward is executed (eager, or captured graphs replayed)."""

from __future__ import annotations


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
