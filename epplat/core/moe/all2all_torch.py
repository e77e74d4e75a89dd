"""all2all backends written against torch.distributed, so every platform has them.

- ``allgather_reducescatter`` (default): every EP rank all-gathers the tokens of all
  ranks, computes its experts' share, and reduce-scatters the sums back.
- ``naive``: every rank broadcasts its tokens in turn; combine is an all-reduce.

Both exchange per-rank token counts once per forward step (``set_step_tokens``), so
ranks with different batch sizes (data parallel attention) work together. With an EP
group of one process they move nothing and only remap expert ids.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from epplat.core.moe.all2all import All2AllBackend, Dispatched
from epplat.hookspecs import Registration, hookimpl

# torch 2.13 renamed these (the *_tensor names warn); the GPU machines' torch 2.11 has only the old ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _TorchDistBackend(All2AllBackend):
    even_experts = False        # tokens reach every rank; g2l knows which slots are local

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.size = 1 if self.group is None else dist.get_world_size(self.group)
        self.rank = 0 if self.group is None else dist.get_rank(self.group)
        self.counts: Optional[list[int]] = None
        self._n = 0
        self._gloo = self.size > 1 and dist.get_backend(self.group) == "gloo"

    def set_step_tokens(self, counts: Optional[list[int]]):
        """Token counts of every EP rank for this forward step (None: exchange per layer)."""
        self.counts = counts

    def _gather_counts(self, n: int) -> list[int]:
        if self.counts is not None:
            return self.counts
        t = torch.tensor([n], dtype=torch.long, device=self.device)
        out = [torch.zeros_like(t) for _ in range(self.size)]
        dist.all_gather(out, t, group=self.group)
        return [int(c) for c in out]

    def _local(self, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.g2l[topk_ids]


class AllGatherReduceScatter(_TorchDistBackend):
    name = "allgather_reducescatter"

    def dispatch(self, x, topk_ids, topk_weights):
        self._n = x.shape[0]
        if self.size == 1:                 # one rank holds every slot: local ids are the slot ids
            return Dispatched(x, topk_ids, topk_weights)
        counts = self._gather_counts(self._n)
        self._counts, self._max = counts, max(counts)
        gx = _all_gather_padded(x, self._max, self.size, self.group)
        gi = _all_gather_padded(topk_ids, self._max, self.size, self.group, fill=0)
        gw = _all_gather_padded(topk_weights, self._max, self.size, self.group)
        ids = self._local(gi)
        valid = (torch.arange(self._max, device=x.device)[None, :] <
                 torch.tensor(counts, device=x.device)[:, None]).reshape(-1, 1)
        ids = torch.where(valid, ids, torch.full_like(ids, -1))
        return Dispatched(gx, ids, gw)

    def combine(self, y):
        if self.size == 1:
            return y
        if self._gloo:  # gloo's reduce-scatter is ~6x slower than its all-reduce of twice the bytes
            dist.all_reduce(y, group=self.group)
            return y[self.rank * self._max:self.rank * self._max + self._n]
        out = torch.empty((self._max, y.shape[1]), dtype=y.dtype, device=y.device)
        _reduce_scatter(out, y.contiguous(), group=self.group)
        return out[: self._n]


class NaiveBroadcast(_TorchDistBackend):
    name = "naive"

    def dispatch(self, x, topk_ids, topk_weights):
        self._n = x.shape[0]
        if self.size == 1:                 # one rank holds every slot: local ids are the slot ids
            return Dispatched(x, topk_ids, topk_weights)
        counts = self._gather_counts(self._n)
        self._counts = counts
        ranks = dist.get_process_group_ranks(self.group)
        parts = []
        for src, n in enumerate(counts):
            bufs = (x, topk_ids, topk_weights) if src == self.rank else (
                x.new_empty((n, x.shape[1])), topk_ids.new_empty((n, topk_ids.shape[1])),
                topk_weights.new_empty((n, topk_weights.shape[1])))
            for b in bufs:
                dist.broadcast(b, src=ranks[src], group=self.group)
            parts.append(bufs)
        gx, gi, gw = (torch.cat(p) for p in zip(*parts))
        return Dispatched(gx, self._local(gi), gw)

    def combine(self, y):
        if self.size == 1:
            return y
        dist.all_reduce(y, group=self.group)
        start = sum(self._counts[: self.rank])
        return y[start:start + self._n]


def _all_gather_padded(t: torch.Tensor, rows: int, size: int, group, fill=0):
    if t.shape[0] < rows:
        pad = t.new_full((rows - t.shape[0], *t.shape[1:]), fill)
        t = torch.cat([t, pad])
    out = t.new_empty((rows * size, *t.shape[1:]))
    _all_gather(out, t.contiguous(), group=group)
    return out


@hookimpl
def epplat_all2all_backends():
    return [
        Registration("allgather_reducescatter", lambda: AllGatherReduceScatter,
                     help="all-gather tokens, reduce-scatter expert outputs (torch.distributed)"),
        Registration("naive", lambda: NaiveBroadcast,
                     help="broadcast every rank's tokens, all-reduce outputs (torch.distributed)"),
    ]
