"""An example third-party epplat plugin: an all2all backend built on all_to_all_single."""

from __future__ import annotations

import torch
import torch.distributed as dist

from epplat.core.moe.all2all import All2AllBackend, Dispatched
from epplat.hookspecs import Registration, hookimpl


class AllToAllSingle(All2AllBackend):
    """Sends each (token, expert) pair to the rank that owns the expert, and back."""

    name = "all_to_all"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.size = 1 if self.group is None else dist.get_world_size(self.group)

    def dispatch(self, x, topk_ids, topk_weights):
        t, k = topk_ids.shape
        flat = topk_ids.reshape(-1)
        dest = flat // self.expert_map.num_local
        order = torch.argsort(flat, stable=True)  # by expert, hence by rank; sums in expert order
        self._token = order // k
        self._send_counts = torch.bincount(dest, minlength=self.size)
        rows = x[self._token]
        ids = (flat[order] % self.expert_map.num_local).unsqueeze(1)
        w = topk_weights.reshape(-1)[order].unsqueeze(1)
        self._t = t
        if self.size == 1:
            self._recv_counts = self._send_counts
            return Dispatched(rows, ids, w)
        recv_counts = torch.empty_like(self._send_counts)
        dist.all_to_all_single(recv_counts, self._send_counts, group=self.group)
        self._recv_counts = recv_counts
        send, recv = self._send_counts.tolist(), recv_counts.tolist()
        return Dispatched(*(self._exchange(a, send, recv) for a in (rows, ids, w)))

    def combine(self, y):
        if self.size > 1:
            y = self._exchange(y, self._recv_counts.tolist(), self._send_counts.tolist())
        out = torch.zeros((self._t, y.shape[1]), dtype=y.dtype, device=y.device)
        return out.index_add_(0, self._token, y)

    def _exchange(self, t, send, recv):
        out = t.new_empty((sum(recv), *t.shape[1:]))
        dist.all_to_all_single(out, t.contiguous(), recv, send, group=self.group)
        return out


@hookimpl
def epplat_all2all_backends():
    return [Registration("all_to_all", lambda: AllToAllSingle,
                         help="per-expert-rank all_to_all_single exchange (example plugin)")]
