"""The DeepEP all2all backends (``deep_ep``, DeepSeek's expert-parallel communication kernels),
written against DeepEP's V1 Python API (``deep_ep.Buffer``):

- ``deepep_high_throughput``: the normal kernels (NVLink within a node, RDMA across). A token
  travels once to every rank holding one of its experts, with its top-k ids made local there
  (-1 elsewhere); ``combine`` sums each token's per-rank results (the experts already weighted
  them). For prefill-sized batches.
- ``deepep_low_latency``: the low-latency kernels for decode-sized steps. Each rank receives its
  experts' tokens in a masked layout [local experts, max tokens x ranks, hidden] with per-expert
  counts; the expert outputs go back unweighted and ``low_latency_combine`` applies the top-k
  weights. Its one low-latency buffer is made once, for ``LOW_LATENCY_TOKENS`` tokens per rank
  (vLLM's VLLM_MOE_DP_CHUNK_SIZE default); a step with more tokens on some rank (a prefill; the
  counts are the same on every rank, ``set_step_tokens``) goes through the normal kernels, as
  vLLM pairs high-throughput prefill with low-latency decode.

DeepEP's own limits are checked before serving, in one line each: the EP sizes its configs map
(deep_ep/buffer.py at commit 567632d), the hidden sizes its low-latency kernels are built for
(csrc/kernels/launch.cuh), top-k at most 11 (csrc/kernels/internode_ll.cu), and a capacity the
NVSHMEM queue pairs hold (``NVSHMEM_QP_DEPTH >= (tokens + 1) * 2``, buffer.py).

Activations travel in bf16 (``--dtype bfloat16``). Exercised in tests through a simulation of
``deep_ep`` on gloo (tests/simulations/deepep) that enforces those rules; not yet run against the real package.
"""

from __future__ import annotations

from typing import Optional

import os

import torch
import torch.distributed as dist

from epplat.config import ConfigError
from epplat.core.moe.all2all import All2AllBackend, Dispatched

# the EP sizes deep_ep's dispatch/combine config maps hold (deep_ep/buffer.py@567632d, get_dispatch_config)
EP_SIZES = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160)
# the hidden sizes the low-latency kernels are compiled for (csrc/kernels/launch.cuh@567632d, SWITCH_HIDDEN)
LOW_LATENCY_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
LOW_LATENCY_MAX_TOPK = 11           # csrc/kernels/internode_ll.cu@567632d, kNumMaxTopK
LOW_LATENCY_TOKENS = 256            # tokens per rank of the low-latency buffer (vLLM's VLLM_MOE_DP_CHUNK_SIZE)


class _DeepEPBase(All2AllBackend):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import deep_ep
        if self.group is None:
            raise ValueError(f"the {self.name} all2all backend needs an expert-parallel process group")
        self.Buffer = deep_ep.Buffer
        self.size = dist.get_world_size(self.group)
        if self.size not in EP_SIZES:
            raise ConfigError(f"--all2all-backend {self.name}: DeepEP supports EP sizes {list(EP_SIZES)}, not "
                              f"{self.size}")
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.size > 8:
            # the normal kernels across nodes initialise NVSHMEM too, a second time beside the low-latency buffer
            raise ConfigError(f"--all2all-backend {self.name} runs prefill through DeepEP's normal kernels, which "
                              f"need NVSHMEM of their own above 8 ranks; EP size {self.size}: use "
                              "deepep_high_throughput")
        depth = int(os.environ.get("NVSHMEM_QP_DEPTH", "1024"))
        self.cap = min(LOW_LATENCY_TOKENS, depth // 2 - 1)      # buffer.py: qp depth >= (cap + 1) * 2
        if self.cap < 1:
            raise ConfigError(f"NVSHMEM_QP_DEPTH={depth} holds no low-latency token (it must be at least 4)")
        self.hidden = None
        self.prefill = DeepEPHighThroughput(*args, **kwargs)
        self._path = self

    def _ensure(self, hidden: int, k: int) -> None:
        if self.buffer is not None:
            return
        if hidden not in LOW_LATENCY_HIDDEN:
            raise ConfigError(f"--all2all-backend {self.name}: DeepEP's low-latency kernels take hidden sizes "
                              f"{list(LOW_LATENCY_HIDDEN)}, not {hidden}")
        if k > LOW_LATENCY_MAX_TOPK:
            raise ConfigError(f"--all2all-backend {self.name}: DeepEP's low-latency kernels take top-k up to "
                              f"{LOW_LATENCY_MAX_TOPK}, not {k}")
        experts = self.expert_map.num_physical
        rdma = self.Buffer.get_low_latency_rdma_size_hint(self.cap, hidden, self.size, experts)
        self.buffer = self.Buffer(self.group, 0, rdma, low_latency_mode=True,
                                  num_qps_per_rank=max(1, experts // self.size))
        self.hidden = hidden

    def dispatch(self, x, topk_ids, topk_weights):
        self._check(x)
        self._ensure(x.shape[1], topk_ids.shape[1])
        tokens = self.step_max if self.step_max is not None else x.shape[0]
        if tokens > self.cap:                     # the step's largest rank, equal on every rank
            self._path = self.prefill
            return self.prefill.dispatch(x, topk_ids, topk_weights)
        self._path = self
        recv, counts, self._handle, _, _ = self.buffer.low_latency_dispatch(
            x, topk_ids, self.cap, self.expert_map.num_physical, use_fp8=False)
        self._ids, self._weights, self._shape = topk_ids, topk_weights.float(), recv.shape
        experts, slots, hidden = recv.shape
        slot = torch.arange(slots, device=x.device)
        # slots past a count hold whatever the buffer held (garbage): id -1, so no expert reads them
        ids = torch.where(slot[None, :] < counts[:, None], torch.arange(experts, device=x.device)[:, None], -1)
        ones = torch.ones((experts * slots, 1), dtype=x.dtype, device=x.device)   # combine applies the weights
        return Dispatched(recv.view(-1, hidden), ids.reshape(-1, 1), ones)

    def combine(self, y):
        if self._path is not self:
            return self.prefill.combine(y)
        out, _, _ = self.buffer.low_latency_combine(y.view(self._shape), self._ids, self._weights, self._handle)
        return out
