"""Graph runners: how a model forward is executed (eager, or captured graphs replayed)."""

from __future__ import annotations


class GraphRunner:
    """Runs model forwards; capture-capable runners replay decode steps from graphs."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def capture(self, batch_sizes: list[int]) -> None:
        """Capture decode steps for these batch sizes (no-op for eager)."""

    def forward(self, input_ids, positions, meta):
        raise NotImplementedError


class EagerRunner(GraphRunner):
    def forward(self, input_ids, positions, meta):
        return self.model(input_ids, positions, meta)
