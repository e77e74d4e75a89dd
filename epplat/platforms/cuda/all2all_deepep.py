"""The DeepEP all2all backends (``deep_ep``, DeepSeek's expert-parallel communication kernels),
written against DeepEP's V1 Python API (``deep_ep.Buffer``):

- ``deepep_high_throughput``: the normal kernels (NVLink within a node, RDMA across). A token
  travels once to every rank holding one of its experts, with its top-k ids made local there
  (-1 elsewhere); ``combine`` sums each token's per-rank results (the experts already weighted
  them). For prefill-sized batches.
- ``deepep_low_latency``: the low-latency kernels. Each rank receives its experts' tokens in a
  masked layout [local experts, max tokens x ranks, hidden] with per-expert counts; the expert
  outputs go back unweighted and ``low_latency_combine`` applies the top-k weights. Buffers
  are sized for the step's largest per-rank token count (``set_step_tokens``, equal on every
  rank). For decode.

Activations travel in bf16 (``--dtype bfloat16``). Exercised in tests through a simulation of
``deep_ep`` on gloo (tests/simulations/deepep); not yet run against the real package.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from epplat.config import ConfigError
from epplat.core.moe.all2all import All2AllBackend, Dispatched


class _DeepEPBase(All2AllBackend):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import deep_ep
        if self.group is None:
            raise ValueError(f"the {self.name} all2all backend needs an expert-parallel process group")
        self.Buffer = deep_ep.Buffer
        self.size = dist.get_world_size(self.group)
        self.buffer = None
        self.step_max: Optional[int] = None

    def set_step_tokens(self, counts: Optional[list[int]]):
        self.step_max = max(counts) if counts else None

    def _check(self, x: torch.Tensor) -> None:
        if x.dtype != torch.bfloat16:
            raise ConfigError(f"--all2all-backend {self.name} moves bfloat16 activations; use --dtype bfloat16")


class DeepEPHighThroughput(_DeepEPBase):
    name = "deepep_high_throughput"

    def _ensure(self, hidden_bytes: int) -> None:
        if self.buffer is not None and hidden_bytes <= self._hidden_bytes:
            return
        configs = (self.Buffer.get_dispatch_config(self.size), self.Buffer.get_combine_config(self.size))
        nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, self.size) for c in configs)
        rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, self.size) for c in configs) if self.size > 8 else 0
        self.buffer, self._hidden_bytes = self.Buffer(self.group, nvl, rdma), hidden_bytes

    def dispatch(self, x, topk_ids, topk_weights):
        self._check(x)
        self._ensure(x.shape[1] * 2)
        per_rank, per_rdma, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(
            topk_ids, self.expert_map.num_physical)
        recv_x, recv_ids, recv_w, _, self._handle, _ = self.buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_ids, topk_weights=topk_weights.float())
        return Dispatched(recv_x, recv_ids, recv_w.to(x.dtype))

    def combine(self, y):
        out, _, _ = self.buffer.combine(y, self._handle)
        return out


class DeepEPLowLatency(_DeepEPBase):
    name = "deepep_low_latency"

    def _ensure(self, tokens: int, hidden: int) -> None:
        cap = max(128, 1 << max(0, tokens - 1).bit_length())
        if self.buffer is not None and cap <= self.cap and hidden == self.hidden:
            return
        experts = self.expert_map.num_physical
        rdma = self.Buffer.get_low_latency_rdma_size_hint(cap, hidden, self.size, experts)
        self.buffer = self.Buffer(self.group, 0, rdma, low_latency_mode=True,
                                  num_qps_per_rank=max(1, experts // self.size))
        self.cap, self.hidden = cap, hidden

    def dispatch(self, x, topk_ids, topk_weights):
        self._check(x)
        self._ensure(self.step_max if self.step_max is not None else x.shape[0], x.shape[1])
        recv, counts, self._handle, _, _ = self.buffer.low_latency_dispatch(
            x, topk_ids, self.cap, self.expert_map.num_physical, use_fp8=False)
        self._ids, self._weights, self._shape = topk_ids, topk_weights.float(), recv.shape
        experts, slots, hidden = recv.shape
        slot = torch.arange(slots, device=x.device)
        ids = torch.where(slot[None, :] < counts[:, None], torch.arange(experts, device=x.device)[:, None], -1)
        ones = torch.ones((experts * slots, 1), dtype=x.dtype, device=x.device)   # combine applies the weights
        return Dispatched(recv.view(-1, hidden), ids.reshape(-1, 1), ones)

    def combine(self, y):
        out, _, _ = self.buffer.low_latency_combine(y.view(self._shape), self._ids, self._weights, self._handle)
        return out
