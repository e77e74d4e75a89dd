"""The ``hccl`` all2all backend: every (token, expert) pair goes to the EP rank holding the expert
through ``torch.distributed.all_to_all_single`` (HCCL's AllToAllV on Ascend), and comes back the
same way; vllm-ascend's all2all path for expert parallelism.

Each pair travels alone (recv.topk_ids has one column), so a rank computes only the pairs
of its own experts. Combine sums a token's k outputs in ascending expert order, the order
the reference experts and Hugging Face accumulate in.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from epplat.core.moe.all2all import All2AllBackend, Dispatched


class HcclAll2All(All2AllBackend):
    name = "hccl"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.size = 1 if self.group is None else dist.get_world_size(self.group)

    def _exchange(self, t: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        out = t.new_empty((sum(recv), *t.shape[1:]))
        dist.all_to_all_single(out, t.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=self.group)
        return out

    def dispatch(self, x, topk_ids, topk_weights):
        self._ids = topk_ids
        if self.size == 1:
            return Dispatched(x, self.g2l[topk_ids], topk_weights)
        tokens, k = topk_ids.shape
        per_rank = self.expert_map.num_local
        flat = topk_ids.reshape(-1)
        dest = torch.div(flat, per_rank, rounding_mode="floor")
        self._order = order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=self.size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        self._send, self._recv = send_counts.tolist(), recv_counts.tolist()
        rows = torch.div(order, k, rounding_mode="floor")
        local = (flat - dest * per_rank).index_select(0, order)
        rx = self._exchange(x.index_select(0, rows), self._send, self._recv)
        rids = self._exchange(local, self._send, self._recv)
        rw = self._exchange(topk_weights.reshape(-1).index_select(0, order), self._send, self._recv)
        return Dispatched(rx, rids[:, None], rw[:, None])

    def combine(self, y):
        if self.size == 1:
            return y
        back = self._exchange(y, self._recv, self._send)
        tokens, k = self._ids.shape
        pairs = torch.empty_like(back).index_copy_(0, self._order, back).view(tokens, k, y.shape[-1])
        pairs = pairs.gather(1, self._ids.argsort(dim=1)[:, :, None].expand(-1, -1, pairs.shape[-1]))
        out = pairs[:, 0]
        for j in range(1, k):
            out = out + pairs[:, j]
        return out
