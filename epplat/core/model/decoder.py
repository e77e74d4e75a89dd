"""A generic decoder-only MoE transformer (Qwen3-MoE / Mixtral family) over a paged KV cache.

Architectures describe themselves with a :class:`DecoderConfig` and a function that
renames their checkpoint tensors to the canonical names used here:

    embed_tokens, norm, lm_head,
    layers.N.{input_layernorm, post_attention_layernorm},
    layers.N.self_attn.{q_proj, k_proj, v_proj, o_proj, q_norm, k_norm},
    layers.N.mlp.gate, layers.N.mlp.experts.E.{gate, up, down}   (MoE layers)
    layers.N.mlp.{gate_proj, up_proj, down_proj}                  (dense layers)

Architectures with other attention (DeepSeek's MLA) or shared experts add their own
layer classes next to these and reuse the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from epplat.core.distributed.parallel_state import ParallelState
from epplat.core.model.attention import AttnMetadata, paged_attention
from epplat.core.model.layers import RMSNorm, RotaryEmbedding
from epplat.core.moe.all2all import All2AllBackend
from epplat.core.moe.layer import FusedMoE
from epplat.core.ops import ACTIVATIONS, TORCH, Kernels, gated_act, linear


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rope_theta: float
    rms_norm_eps: float
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    intermediate_size: int
    norm_topk_prob: bool = True
    qk_norm: bool = False
    attention_bias: bool = False
    act: str = "silu"
    tie_word_embeddings: bool = False
    dense_layers: set = field(default_factory=set)
    eos_token_ids: list = field(default_factory=list)


def _param(*shape, dtype):
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _tp_all_reduce(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    if ps.tp_size > 1:
        dist.all_reduce(x, group=ps.tp_group)
    return x


class Projections(nn.Module):
    """A module whose linear layers are parameters ``NAME`` [out, in] (with ``NAME_bias`` where it has one),
    run as ``self.project(NAME, x)`` through ``self.kernels``; a quantization method may replace ``project``
    on the instance."""

    kernels: Kernels = TORCH

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return linear(x, getattr(self, name), getattr(self, name + "_bias", None), self.kernels)


class Attention(Projections):
    """Self-attention, heads sharded over the TP group (KV heads replicated when fewer than TP ranks)."""

    def __init__(self, cfg: DecoderConfig, rope: RotaryEmbedding, ps: ParallelState, dtype, kernels: Kernels = TORCH):
        super().__init__()
        t, r = ps.tp_size, ps.tp_rank          # the layout splits the heads (epplat.config.check_layout)
        self.ps, self.kernels = ps, kernels
        self.h, self.d = cfg.num_heads // t, cfg.head_dim
        self.kvh = max(1, cfg.num_kv_heads // t)
        self.q_start = r * self.h
        self.kv_start = r * self.kvh if cfg.num_kv_heads >= t else r // (t // cfg.num_kv_heads)
        self.qkv = _param((self.h + 2 * self.kvh) * self.d, cfg.hidden_size, dtype=dtype)
        self.qkv_bias = _param((self.h + 2 * self.kvh) * self.d, dtype=dtype) if cfg.attention_bias else None
        self.o_proj = _param(cfg.hidden_size, self.h * self.d, dtype=dtype)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps, dtype, kernels) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps, dtype, kernels) if cfg.qk_norm else None
        self.rope = rope
        self.scale = self.d ** -0.5
        self.kv_cache: Optional[tuple] = None

    def forward(self, x, positions, meta: AttnMetadata):
        qkv = self.project("qkv", x)
        q, k, v = qkv.split([self.h * self.d, self.kvh * self.d, self.kvh * self.d], dim=-1)
        q, k, v = q.view(-1, self.h, self.d), k.view(-1, self.kvh, self.d), v.view(-1, self.kvh, self.d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(positions, q, k)
        o = paged_attention(q, k, v.contiguous(), self.kv_cache, meta, self.scale, self.kernels)
        return _tp_all_reduce(self.project("o_proj", o.reshape(-1, self.h * self.d)), self.ps)

    def weight_names(self) -> set[str]:
        names = {f"{x}_proj" for x in "qkvo"} | ({"q_norm", "k_norm"} if self.q_norm is not None else set())
        return names | ({f"{x}_proj_bias" for x in "qkv"} if self.qkv_bias is not None else set())

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> list[tuple]:
        """Shapes of this layer's KV cache tensors (keys, values)."""
        return [(num_blocks, block_size, self.kvh, self.d)] * 2

    def load(self, name: str, t: torch.Tensor, into: Optional[torch.Tensor] = None):
        """Copy this rank's part of checkpoint tensor `name`; `into` takes q/k/v's rows instead of qkv
        (a quantization method's per-output-channel scales)."""
        d, q, kv = self.d, self.h * self.d, self.kvh * self.d
        rows = {"q": (self.q_start * d, q, 0), "k": (self.kv_start * d, kv, q), "v": (self.kv_start * d, kv, q + kv)}
        if name in ("q_proj", "k_proj", "v_proj", "q_proj_bias", "k_proj_bias", "v_proj_bias"):
            src, n, dst_start = rows[name[0]]
            dst = into if into is not None else self.qkv if not name.endswith("bias") else self.qkv_bias
            dst.data[dst_start:dst_start + n].copy_(t[src:src + n])
        elif name == "o_proj":
            self.o_proj.data.copy_(t[:, self.q_start * d:self.q_start * d + q])
        elif name in ("q_norm", "k_norm"):
            getattr(self, name).weight.data.copy_(t)
        else:
            raise KeyError(name)


class DenseMLP(Projections):
    """A gated MLP, its intermediate dimension sharded over the TP group."""

    def __init__(self, hidden: int, inter: int, act, ps: ParallelState, dtype, kernels: Kernels = TORCH):
        super().__init__()
        self.inter, self.act, self.ps, self.kernels = inter // ps.tp_size, act, ps, kernels
        self.start = ps.tp_rank * self.inter
        self.gate_up = _param(2 * self.inter, hidden, dtype=dtype)
        self.down = _param(hidden, self.inter, dtype=dtype)

    def forward(self, x):
        return _tp_all_reduce(self.project("down", gated_act(self.project("gate_up", x), self.act)), self.ps)

    def load(self, name: str, t: torch.Tensor, into: Optional[torch.Tensor] = None):
        """Copy this rank's part of checkpoint tensor `name`; `into` takes gate/up's rows instead of gate_up."""
        part = t[self.start:self.start + self.inter] if name != "down_proj" else t[:, self.start:self.start + self.inter]
        dst = self.gate_up if into is None else into
        if name == "gate_proj":
            dst.data[: self.inter].copy_(part)
        elif name == "up_proj":
            dst.data[self.inter:].copy_(part)
        elif name == "down_proj":
            self.down.data.copy_(part)
        else:
            raise KeyError(name)


def layer_mlp(cfg: DecoderConfig, idx: int, act, all2all: All2AllBackend, ps: ParallelState, dtype, routing=None,
              kernels: Kernels = TORCH):
    """Layer idx's dense MLP or routed experts (``routing``: a DeepSeek-style router)."""
    if idx in cfg.dense_layers or cfg.num_experts == 0:
        return DenseMLP(cfg.hidden_size, cfg.intermediate_size, act, ps, dtype, kernels)
    tp = 1 if ps.ep else ps.tp_size      # without EP, every TP rank holds a 1/TP slice of every expert
    return FusedMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.top_k, cfg.norm_topk_prob,
                    act, all2all, dtype, tp_rank=ps.tp_rank if tp > 1 else 0, tp_size=tp, routing=routing,
                    kernels=kernels)


class DecoderLayer(nn.Module):
    attention_class = Attention

    def __init__(self, cfg: DecoderConfig, idx: int, rope, all2all: All2AllBackend, ps: ParallelState, dtype,
                 routing=None, kernels: Kernels = TORCH):
        super().__init__()
        act = ACTIVATIONS[cfg.act]
        self.ps, self.kernels = ps, kernels
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, kernels)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, kernels)
        self.self_attn = self.attention_class(cfg, rope, ps, dtype, kernels)
        self.mlp = layer_mlp(cfg, idx, act, all2all, ps, dtype, routing, kernels)

    def load(self, rest: str, t: torch.Tensor) -> bool:
        """Copy one of this layer's tensors (its name after ``layers.N.``); False when this rank keeps none."""
        part, _, sub = rest.partition(".")
        if part in ("input_layernorm", "post_attention_layernorm"):
            getattr(self, part).weight.data.copy_(t)
        elif part == "self_attn":
            self.self_attn.load(sub, t)
        elif isinstance(self.mlp, FusedMoE):
            m = _EXPERT.search(sub)
            if m:
                return self.mlp.load_expert_weight(int(m.group(1)), m.group(2), t)
            if sub != "gate":
                raise KeyError(rest)
            self.mlp.gate.data.copy_(t)
        else:
            self.mlp.load(sub, t)
        return True

    def weight_names(self) -> set[str]:
        """Names (after ``layers.N.``) of every tensor of this layer this rank must load."""
        names = {"input_layernorm", "post_attention_layernorm"}
        names |= {"self_attn." + n for n in self.self_attn.weight_names()}
        if isinstance(self.mlp, FusedMoE):
            names.add("mlp.gate")
            return names | {f"mlp.experts.{e}.{w}" for e in self.mlp.local_logical_ids() for w in ("gate", "up", "down")}
        return names | {f"mlp.{w}_proj" for w in ("gate", "up", "down")}

    def forward(self, x, positions, meta):
        kernel = self.kernels.decoder_layer
        out = kernel(self, x, positions, meta) if kernel is not None else None
        if out is not None:
            return out
        x = x + self.self_attn(self.input_layernorm(x), positions, meta)
        h = self.mlp(self.post_attention_layernorm(x))
        if isinstance(self.mlp, FusedMoE) and self.mlp.tp_size > 1:
            h = _tp_all_reduce(h, self.ps)
        return x + h

_EXPERT = re.compile(r"experts\.(\d+)\.(gate|up|down)$")


class MoEForCausalLM(nn.Module):
    layer_class = DecoderLayer     # architectures with other layers (DeepSeek) subclass with theirs

    def __init__(self, cfg: DecoderConfig, all2all: All2AllBackend, dtype, ps: Optional[ParallelState] = None,
                 kernels: Kernels = TORCH):
        """``kernels``: the platform's record (epplat.core.ops), handed to every layer."""
        super().__init__()
        self.cfg, self.kernels = cfg, kernels
        ps = ps or ParallelState()
        # a pipeline stage holds its layers; the first also the embedding and lm_head (the driver samples), the
        # last the final norm (epplat.core.distributed.pipeline)
        self.start, self.end = 0, cfg.num_layers
        if ps.pp_size > 1:
            from epplat.core.distributed.pipeline import layer_range
            self.start, self.end = layer_range(cfg.num_layers, ps.pp_rank, ps.pp_size)
        first, last = ps.pp_rank == 0, ps.pp_rank == ps.pp_size - 1
        rope = self.make_rope(cfg, kernels)
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype) if first else None
        self.layers = nn.ModuleList(self.layer_class(cfg, i, rope, all2all, ps, dtype, kernels=kernels)
                                    for i in range(self.start, self.end))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, kernels) if last else None
        self.lm_head = None if not first else self.embed_tokens if cfg.tie_word_embeddings else _param(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.rope = rope

    @staticmethod
    def make_rope(cfg, kernels: Kernels = TORCH):
        return RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta, kernels)

    def forward(self, input_ids, positions, meta: AttnMetadata, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``hidden``: the previous pipeline stage's output (this stage embeds no tokens then)."""
        x = F.embedding(input_ids, self.embed_tokens) if hidden is None else hidden
        for layer in self.layers:
            x = layer(x, positions, meta)
        return self.norm(x) if self.norm is not None else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head, None, self.kernels)

    def load_weight(self, name: str, t: torch.Tensor) -> bool:
        """Copy one tensor given by its canonical name; False when this rank keeps none of it."""
        if name in ("embed_tokens", "lm_head"):
            if (name == "lm_head" and self.cfg.tie_word_embeddings) or getattr(self, name) is None:
                return False
            getattr(self, name).data.copy_(t)
            return True
        if name == "norm":
            if self.norm is None:
                return False
            self.norm.weight.data.copy_(t)
            return True
        _, idx, rest = name.split(".", 2)
        layer = self._layer_at(int(idx))
        return layer is not None and layer.load(rest, t)

    def _layer_at(self, idx: int):
        """The decoder layer a checkpoint's layer index names; None when another pipeline stage holds it."""
        return self.layers[idx - self.start] if self.start <= idx < self.end else None

    def kv_layers(self) -> list:
        """The attention modules that own a KV cache, in order."""
        return [layer.self_attn for layer in self.layers]

    def required_names(self) -> set[str]:
        """Canonical names of every tensor this rank must load."""
        names = {n for n in ("embed_tokens", "norm", "lm_head") if getattr(self, n) is not None}
        if self.cfg.tie_word_embeddings:
            names.discard("lm_head")
        for i, layer in enumerate(self.layers, self.start):
            names |= {f"layers.{i}.{n}" for n in layer.weight_names()}
        return names

    def wants(self, name: str) -> bool:
        """Whether this rank needs the canonical tensor `name` at all (skips other ranks' experts)."""
        if name in ("embed_tokens", "lm_head", "norm"):
            return getattr(self, name) is not None and not (name == "lm_head" and self.cfg.tie_word_embeddings)
        layer = self._layer_at(int(name.split(".")[1])) if name.startswith("layers.") else self
        if layer is None:
            return False                       # another pipeline stage's layer
        m = _EXPERT.search(name)
        return not m or (isinstance(layer.mlp, FusedMoE) and int(m.group(1)) in layer.mlp.local_logical_ids())
