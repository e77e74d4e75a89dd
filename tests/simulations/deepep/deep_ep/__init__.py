"""A simulation of ``deep_ep`` (DeepEP's V1 Python API) for tests without GPUs: ``Buffer`` with
the methods epplat's DeepEP backends call, moving data with torch.distributed on any backend
(gloo here). It reproduces the documented semantics, not the kernels:

- ``get_dispatch_layout(topk_idx, num_experts)``: tokens per rank, per expert, token-in-rank mask;
- ``dispatch``: each token once to every rank holding one of its experts, top-k ids made local
  there (-1 elsewhere), received in source-rank order;
- ``combine``: the rows back to their source, summed per token without weights;
- ``low_latency_dispatch``: per local expert, its tokens packed in [local experts, max tokens x
  ranks, hidden] with counts (bf16 only: ``use_fp8`` must be False);
- ``low_latency_combine``: the rows back, reduced with the top-k weights.

``calls`` records (method, arguments of interest) so tests can check how the buffer was used.

It is as strict as the real package where DeepEP states a rule (each cites deep_ep at commit 567632d,
DeepEP's last V1 commit): EP sizes outside the dispatch/combine config maps, low-latency hidden sizes
outside ``SWITCH_HIDDEN``, top-k above 11 in the low-latency kernels, a capacity the NVSHMEM queue
pairs cannot hold, a second live low-latency buffer (NVSHMEM initialised twice), and the unused
slots of the low-latency receive buffer hold garbage (NaN here), not zeros.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

calls: list = []

# deep_ep/buffer.py@567632d, get_dispatch_config / get_combine_config: `assert num_ranks in config_map`
CONFIG_MAP_RANKS = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160)
# csrc/kernels/launch.cuh@567632d, SWITCH_HIDDEN (the low-latency kernels): EP_HOST_ASSERT "Unsupported hidden"
LOW_LATENCY_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
# csrc/kernels/internode_ll.cu@567632d, dispatch: kNumMaxTopK = 11; EP_HOST_ASSERT(num_topk <= kNumMaxTopK)
LOW_LATENCY_MAX_TOPK = 11
_live_low_latency: list = []     # NVSHMEM is initialised once per process (csrc/deep_ep.cpp@567632d, sync)


def _config(num_ranks):
    assert num_ranks in CONFIG_MAP_RANKS, f"Unsupported number of EP ranks: {num_ranks}"
    return _Config()


class _Config:
    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        return hidden_bytes * 4096 * num_ranks

    def get_rdma_buffer_size_hint(self, hidden_bytes, num_ranks):
        return hidden_bytes * 4096 * num_ranks


def _exchange(t: torch.Tensor, send: list, recv: list, group) -> torch.Tensor:
    wire = t.contiguous().view(torch.uint8) if t.dtype == torch.bfloat16 else t.contiguous()   # gloo moves bytes
    out = wire.new_empty((sum(recv), *wire.shape[1:]))
    dist.all_to_all_single(out, wire, output_split_sizes=recv, input_split_sizes=send, group=group)
    return out.view(t.dtype)


def _counts(send: list, group) -> list:
    s = torch.tensor(send, dtype=torch.long)
    r = torch.empty_like(s)
    dist.all_to_all_single(r, s, group=group)
    return r.tolist()


class Buffer:
    num_sms = 20

    def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=12,
                 allow_nvlink_for_low_latency_mode=True):
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        self.low_latency_mode = low_latency_mode
        if low_latency_mode:
            # deep_ep/buffer.py@567632d, __init__: the low-latency mode initialises NVSHMEM (internode::init in
            # csrc/deep_ep.cpp sync); a second live buffer initialises it again, and finalises it late
            assert not _live_low_latency, "a low-latency Buffer is already live in this process (NVSHMEM init twice)"
            _live_low_latency.append(self)
            assert num_qps_per_rank > 0
            # deep_ep/buffer.py@567632d: NVSHMEM_QP_DEPTH, default 1024
            self.nvshmem_qp_depth = int(os.environ.get("NVSHMEM_QP_DEPTH", "1024"))
        if num_rdma_bytes and not low_latency_mode:
            # csrc/deep_ep.cpp@567632d, Buffer(): RDMA bytes only for internode (> 8 ranks) or low-latency mode
            assert self.group_size > 8 or low_latency_mode
        calls.append(("Buffer", dict(num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes,
                                     low_latency_mode=low_latency_mode, num_qps_per_rank=num_qps_per_rank)))

    def destroy(self):
        if self in _live_low_latency:
            _live_low_latency.remove(self)

    @staticmethod
    def get_dispatch_config(num_ranks):
        return _config(num_ranks)

    @staticmethod
    def get_combine_config(num_ranks):
        return _config(num_ranks)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts):
        return num_max_dispatch_tokens_per_rank * hidden * 2 * num_experts

    # -- normal kernels -------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        assert topk_idx.dtype == torch.int64
        per = num_experts // self.group_size
        rank_of = torch.where(topk_idx >= 0, topk_idx // per, -1)
        in_rank = torch.stack([(rank_of == r).any(dim=1) for r in range(self.group_size)], dim=1)
        per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).int()
        self._per = per
        return in_rank.sum(0).int(), None, per_expert, in_rank, None

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment=1, config=None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False):
        assert x.dtype == torch.bfloat16 and topk_weights.dtype == torch.float32 and handle is None
        config = config or self.get_dispatch_config(self.group_size)     # buffer.py@567632d: the same default
        per, rows, xs, ids, ws = self._per, [], [], [], []
        for r in range(self.group_size):
            sel = is_token_in_rank[:, r].nonzero().flatten()
            local = topk_idx[sel] - r * per
            rows.append(sel)
            xs.append(x[sel])
            ids.append(torch.where((local >= 0) & (local < per) & (topk_idx[sel] >= 0), local, -1))
            ws.append(topk_weights[sel])
        send = [len(s) for s in rows]
        recv = _counts(send, self.group)
        recv_x = _exchange(torch.cat(xs), send, recv, self.group)
        recv_ids = _exchange(torch.cat(ids), send, recv, self.group)
        recv_w = _exchange(torch.cat(ws), send, recv, self.group)
        per_local = torch.bincount(recv_ids[recv_ids >= 0], minlength=per).tolist()
        calls.append(("dispatch", dict(tokens=x.shape[0])))
        return recv_x, recv_ids, recv_w, per_local, (torch.cat(rows), send, recv, x.shape[0]), None

    def combine(self, x, handle, topk_weights=None, config=None, previous_event=None, async_finish=False,
                allocate_on_comm_stream=False):
        rows, send, recv, tokens = handle
        config = config or self.get_combine_config(self.group_size)
        back = _exchange(x, recv, send, self.group)
        out = torch.zeros((tokens, x.shape[1]), dtype=torch.float32).index_add_(0, rows, back.float())
        calls.append(("combine", dict(rows=x.shape[0])))
        return out.to(x.dtype), None, None

    # -- low-latency kernels ----------------------------------------------------------------------------
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=True,
                             async_finish=False, return_recv_hook=False):
        assert self.low_latency_mode and not use_fp8, "the simulation moves bf16 only"
        # deep_ep/buffer.py@567632d, low_latency_dispatch / low_latency_combine
        assert self.nvshmem_qp_depth >= (num_max_dispatch_tokens_per_rank + 1) * 2
        assert x.shape[0] <= num_max_dispatch_tokens_per_rank
        assert x.shape[1] in LOW_LATENCY_HIDDEN, "Unsupported hidden"
        assert topk_idx.shape[1] <= LOW_LATENCY_MAX_TOPK
        per = num_experts // self.group_size
        t_idx, k_idx = (topk_idx >= 0).nonzero(as_tuple=True)
        dest = topk_idx[t_idx, k_idx] // per
        order = torch.argsort(dest, stable=True)
        t_idx, k_idx, dest = t_idx[order], k_idx[order], dest[order]
        send = torch.bincount(dest, minlength=self.group_size).tolist()
        recv = _counts(send, self.group)
        meta = torch.stack([t_idx, topk_idx[t_idx, k_idx] % per], dim=1)
        rx = _exchange(x[t_idx], send, recv, self.group)
        rmeta = _exchange(meta, send, recv, self.group)
        cap = num_max_dispatch_tokens_per_rank * self.group_size
        # slots past a local expert's count are never written: real memory holds garbage there
        packed = torch.full((per, cap, x.shape[1]), float("nan"), dtype=x.dtype)
        counts = torch.zeros(per, dtype=torch.int32)
        src = torch.full((per, cap, 2), -1, dtype=torch.long)        # (source rank, source token) of each slot
        src_rank = torch.repeat_interleave(torch.arange(self.group_size), torch.tensor(recv))
        for i in range(rx.shape[0]):
            e = int(rmeta[i, 1])
            packed[e, counts[e]] = rx[i]
            src[e, counts[e]] = torch.tensor([int(src_rank[i]), int(rmeta[i, 0])])
            counts[e] += 1
        calls.append(("low_latency_dispatch", dict(tokens=x.shape[0], cap=num_max_dispatch_tokens_per_rank)))
        return packed, counts, (src, counts.clone(), per, num_max_dispatch_tokens_per_rank), None, None

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, zero_copy=False, async_finish=False,
                            return_recv_hook=False, out=None):
        src, counts, per, cap = handle
        assert self.nvshmem_qp_depth >= (cap + 1) * 2
        assert x.shape[-1] in LOW_LATENCY_HIDDEN, "Unsupported hidden"
        rows, dest, meta = [], [], []
        for e in range(per):
            for s in range(int(counts[e])):
                rows.append(x[e, s])
                dest.append(int(src[e, s, 0]))
                meta.append([int(src[e, s, 1]), self.rank * per + e])
        order = sorted(range(len(rows)), key=lambda i: dest[i])
        send = [dest.count(r) for r in range(self.group_size)]
        recv = _counts(send, self.group)
        hidden = x.shape[-1]
        back = _exchange(torch.stack([rows[i] for i in order]) if rows else x.new_empty((0, hidden)), send, recv,
                         self.group)
        bmeta = _exchange(torch.tensor([meta[i] for i in order], dtype=torch.long).view(-1, 2), send, recv, self.group)
        result = torch.zeros((topk_idx.shape[0], hidden), dtype=torch.float32)
        for i in range(back.shape[0]):
            t, expert = int(bmeta[i, 0]), int(bmeta[i, 1])
            k = int((topk_idx[t] == expert).nonzero()[0, 0])
            result[t] += topk_weights[t, k] * back[i].float()
        calls.append(("low_latency_combine", dict(rows=len(rows))))
        return result.to(x.dtype), None, None
