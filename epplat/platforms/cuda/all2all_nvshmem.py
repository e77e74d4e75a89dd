"""The ``nvshmem`` all2all backend: every (token, expert) pair goes to the EP rank holding the
expert through PyTorch's symmetric memory on NVSHMEM (``torch.ops.symm_mem.all_to_all_vdev``),
and comes back the same way.

Unlike NCCL's all_to_all_single, the exchange takes its split sizes from device memory, so
dispatch and combine never wait for the host: send counts are computed on the GPU, the
receiving rank learns its counts (and offsets) from the exchange itself. Received rows sit
in fixed-capacity symmetric buffers; rows past the received count carry expert id -1, which
the expert kernels skip. Buffers are sized from the step's largest per-rank token count
(``set_step_tokens``, the same on every rank) and grow, collectively, when it does.

Each pair travels alone (recv.topk_ids has one column). Combine sums a token's k outputs in
ascending expert order, as the reference experts and Hugging Face do.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from epplat.core.moe.all2all import All2AllBackend, Dispatched


def check() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError:
        return "torch without symmetric memory"
    if not hasattr(torch.ops.symm_mem, "all_to_all_vdev") or not symm_mem.is_nvshmem_available():
        return "NVSHMEM not available to torch (pip install nvidia-nvshmem-cu13)"
    return None


class NvshmemAll2All(All2AllBackend):
    name = "nvshmem"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import torch.distributed._symmetric_memory as symm_mem
        if self.group is None:
            raise ValueError("the nvshmem all2all backend needs an expert-parallel process group")
        self.symm = symm_mem
        symm_mem.set_backend("NVSHMEM")
        self.size = dist.get_world_size(self.group)
        self.group_name = self.group.group_name
        self.rows, self._shape = 0, None    # capacity: (token, expert) rows one rank sends
        self.max_tokens: Optional[int] = None
        self._five_args = len(torch.ops.symm_mem.all_to_all_vdev.default._schema.arguments) == 5

    def set_step_tokens(self, counts: Optional[list[int]]):
        self.max_tokens = max(counts) if counts else None

    # -- buffers -------------------------------------------------------------------------------------
    def _buffer(self, numel: int, dtype) -> torch.Tensor:
        t = self.symm.empty(numel, dtype=dtype, device=self.device)
        self.symm.rendezvous(t, group=self.group_name)
        return t

    def _ensure(self, tokens: int, k: int, hidden: int, dtype) -> None:
        """Collective: every rank calls it with the same arguments (the step's largest token count)."""
        rows = max(64, 1 << (tokens * k - 1).bit_length())
        if rows <= self.rows and (hidden, dtype) == self._shape:
            return
        self.rows, self._shape, w = rows, (hidden, dtype), self.size
        self.x_in, self.x_out = self._buffer(rows * hidden, dtype), self._buffer(w * rows * hidden, dtype)
        self.m_in, self.m_out = self._buffer(rows * 2, torch.float32), self._buffer(w * rows * 2, torch.float32)
        self.y_in, self.y_out = self._buffer(w * rows * hidden, dtype), self._buffer(rows * hidden, dtype)
        # split sizes, one set per exchange: (in [w], out splits and offsets [2, w]) or, for the
        # older op signature, one [3, w] tensor holding all three rows
        self.splits = [(self._buffer(w, torch.int64), self._buffer(2 * w, torch.int64).view(2, w)) if self._five_args
                       else (None, self._buffer(3 * w, torch.int64).view(3, w)) for _ in range(3)]

    def _exchange(self, src: torch.Tensor, dst: torch.Tensor, counts: torch.Tensor, splits, width: int):
        """all_to_all_vdev of src (rows of `width` elements, `counts[r]` for rank r, packed by rank)
        into dst; returns the received row counts per source rank (device tensor)."""
        ins, outs = splits
        if self._five_args:
            ins.copy_(counts * width)
            torch.ops.symm_mem.all_to_all_vdev(src, dst, ins, outs, self.group_name)
            return torch.div(outs[0], width, rounding_mode="floor")
        outs[0].copy_(counts * width)
        torch.ops.symm_mem.all_to_all_vdev(src, dst, outs, self.group_name)
        return torch.div(outs[1], width, rounding_mode="floor")

    # -- the exchange ----------------------------------------------------------------------------------
    def dispatch(self, x, topk_ids, topk_weights):
        tokens, k = topk_ids.shape
        hidden = x.shape[1]
        self._ensure(self.max_tokens if self.max_tokens is not None else tokens, k, hidden, x.dtype)
        self._ids = topk_ids
        per_rank = self.expert_map.num_local
        flat = topk_ids.reshape(-1)
        dest = torch.div(flat, per_rank, rounding_mode="floor")
        self._order = order = torch.argsort(dest, stable=True)
        self._send = torch.bincount(dest, minlength=self.size)
        n = tokens * k
        self.x_in[: n * hidden].view(n, hidden).copy_(x.index_select(0, torch.div(order, k, rounding_mode="floor")))
        meta = self.m_in[: 2 * n].view(n, 2)
        meta[:, 0].copy_((flat - dest * per_rank).index_select(0, order))
        meta[:, 1].copy_(topk_weights.reshape(-1).index_select(0, order))
        self._recv = self._exchange(self.x_in, self.x_out, self._send, self.splits[0], hidden)
        self._exchange(self.m_in, self.m_out, self._send, self.splits[1], 2)
        cap = self.size * self.rows
        valid = torch.arange(cap, device=x.device) < self._recv.sum()
        meta = self.m_out.view(cap, 2)
        ids = torch.where(valid, meta[:, 0].to(torch.long), -1)
        return Dispatched(self.x_out.view(cap, hidden), ids[:, None], meta[:, 1:].to(topk_weights.dtype))

    def combine(self, y):
        tokens, k = self._ids.shape
        hidden = y.shape[1]
        self.y_in.view(-1, hidden).copy_(y)          # rows arrived packed by source rank: send them back so
        self._exchange(self.y_in, self.y_out, self._recv, self.splits[2], hidden)
        back = self.y_out[: tokens * k * hidden].view(tokens * k, hidden)
        pairs = torch.empty_like(back).index_copy_(0, self._order, back).view(tokens, k, hidden)
        pairs = pairs.gather(1, self._ids.argsort(dim=1)[:, :, None].expand(-1, -1, hidden))
        out = pairs[:, 0]
        for j in range(1, k):
            out = out + pairs[:, j]
        return out
