"""Pipeline parallelism: which layers a stage holds, and the activations passed stage to stage.

The split is vLLM's: ``EPPLAT_PP_LAYER_PARTITION`` (or vLLM's ``VLLM_PP_LAYER_PARTITION``), a comma
list of layer counts, sets it by hand; otherwise every stage gets ``layers // P`` and the layers
left over go one each to the stages before the last, from the second-to-last backwards (the last
stage also runs the final norm). Activations (the hidden states; this decoder keeps no separate
residual) go over the platform's point-to-point ops (``torch.distributed`` isend/recv: gloo on
cpu) from each rank to the rank of the same TP rank in the next stage; the last stage's TP rank 0
sends the rows the sampler needs back to the driver (stage 0, TP rank 0), which holds ``lm_head``.
"""

from __future__ import annotations

import os
from collections import deque

import torch
import torch.distributed as dist

from epplat.config import ConfigError

_TAG_NEXT, _TAG_OUT = 1, 2


def layer_partition(num_layers: int, pp_size: int) -> list[int]:
    """Layers per stage."""
    raw = os.environ.get("EPPLAT_PP_LAYER_PARTITION") or os.environ.get("VLLM_PP_LAYER_PARTITION")
    if raw:
        try:
            parts = [int(x) for x in raw.split(",")]
        except ValueError:
            raise ConfigError(f"EPPLAT_PP_LAYER_PARTITION={raw!r} is not a comma-separated list of integers") from None
        if len(parts) != pp_size or sum(parts) != num_layers or min(parts) < 1:
            raise ConfigError(f"EPPLAT_PP_LAYER_PARTITION={raw!r} must give {pp_size} stages (--pipeline-parallel-size)"
                              f" of at least one layer each, {num_layers} layers in all")
        return parts
    if num_layers < pp_size:
        raise ConfigError(f"{num_layers} layers do not split over --pipeline-parallel-size {pp_size}")
    parts = [num_layers // pp_size] * pp_size
    for i in range(2, num_layers % pp_size + 2):
        parts[-i] += 1
    return parts


def layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """[start, end) of the layers stage ``pp_rank`` holds."""
    parts = layer_partition(num_layers, pp_size)
    start = sum(parts[:pp_rank])
    return start, start + parts[pp_rank]


class StageLink:
    """One rank's point-to-point links: from the previous stage, to the next, and (last stage, TP rank 0)
    back to the driver. Sends are asynchronous (several micro-batches may be in flight); a sent tensor is
    kept until its send completes."""

    def __init__(self, ps, hidden_size: int, dtype, device):
        self.ps, self.hidden, self.dtype, self.device = ps, hidden_size, dtype, device
        per_dp = ps.pp_size * ps.tp_size
        base = ps.dp_rank * per_dp
        self.prev = base + (ps.pp_rank - 1) * ps.tp_size + ps.tp_rank if ps.pp_rank > 0 else None
        self.next = base + (ps.pp_rank + 1) * ps.tp_size + ps.tp_rank if ps.pp_rank < ps.pp_size - 1 else None
        self.driver = base
        self.last_tp0 = base + (ps.pp_size - 1) * ps.tp_size
        self.sends: deque = deque()

    @property
    def first(self) -> bool:
        return self.prev is None

    @property
    def last(self) -> bool:
        return self.next is None

    def recv_hidden(self, rows: int) -> torch.Tensor:
        x = torch.empty(rows, self.hidden, dtype=self.dtype, device=self.device)
        dist.recv(x, self.prev, tag=_TAG_NEXT)
        return x

    def _isend(self, x: torch.Tensor, dst: int, tag: int) -> None:
        while self.sends and self.sends[0][0].is_completed():
            self.sends.popleft()
        x = x.contiguous()
        self.sends.append((dist.isend(x, dst, tag=tag), x))

    def send_hidden(self, x: torch.Tensor) -> None:
        self._isend(x, self.next, _TAG_NEXT)

    def send_output(self, rows: torch.Tensor) -> None:
        """Last stage, TP rank 0: the final hidden states of the rows the driver samples from."""
        self._isend(rows, self.driver, _TAG_OUT)

    def post_output_recv(self, rows: int):
        """Driver: receive a step's output rows (posted at launch; waited on when the step completes)."""
        out = torch.empty(rows, self.hidden, dtype=self.dtype, device=self.device)
        return dist.irecv(out, self.last_tp0, tag=_TAG_OUT), out
