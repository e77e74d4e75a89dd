"""DeepSeek-V2/V3 (DeepseekV2ForCausalLM, DeepseekV3ForCausalLM): config, tensor names, layers.

One code path serves both (and the checkpoints that reuse them, e.g. Kimi-K2, Moonlight):
MLA attention (epplat.core.model.mla), DeepSeek routing (epplat.core.moe.routing) with
shared experts added to the routed sum, and dense MLPs for the first
``first_k_dense_replace`` layers. The routing follows the config keys, as vLLM does:
``scoring_func`` (V2 checkpoints omit it: softmax), ``topk_method`` (greedy,
group_limited_greedy, noaux_tc with ``e_score_correction_bias``), ``n_group`` /
``topk_group``, ``norm_topk_prob``, ``routed_scaling_factor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from epplat.core.model.decoder import DecoderConfig, DecoderLayer, DenseMLP, MoEForCausalLM, _tp_all_reduce
from epplat.core.model.deepseek_mtp import DeepseekMTP
from epplat.core.model.mla import MLAttention
from epplat.core.model.rope_yarn import DeepseekRotary, rope_type
from epplat.core.moe.layer import FusedMoE
from epplat.core.moe.routing import GroupedTopK
from epplat.core.ops import ACTIVATIONS, TORCH, Kernels

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass
class DeepseekConfig(DecoderConfig):
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_scaling: Optional[dict] = None
    rope_interleave: bool = True
    n_shared_experts: int = 0
    routing: Optional[GroupedTopK] = None
    num_expert_groups: int = 1
    num_mtp_layers: int = 0
    use_mtp: bool = False          # build the first MTP layer (deepseek_mtp speculative decoding)


def parse_config(hf: dict) -> DeepseekConfig:
    layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    experts = hf.get("n_routed_experts") or 0
    method = hf.get("topk_method") or "greedy"
    if method not in TOPK_METHODS:
        raise ValueError(f"topk_method {method!r} is not one of {', '.join(TOPK_METHODS)}")
    grouped = method != "greedy"
    n_group = (hf.get("n_group") or 1) if grouped else 1
    routing = GroupedTopK(
        top_k=hf["num_experts_per_tok"], num_experts=experts, scoring=hf.get("scoring_func") or "softmax",
        n_group=n_group, topk_group=(hf.get("topk_group") or 1) if grouped else 1,
        renormalize=bool(hf.get("norm_topk_prob")), scaling=float(hf.get("routed_scaling_factor") or 1.0),
        use_bias=method == "noaux_tc") if experts else None
    moe_freq = hf.get("moe_layer_freq", 1) or 1
    first_dense = hf.get("first_k_dense_replace", 0) or 0
    dense = {i for i in range(layers) if i < first_dense or i % moe_freq}
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    rope_type(scaling)
    theta = hf.get("rope_theta") or (scaling or {}).get("rope_theta") or 10000.0
    return DeepseekConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=layers, num_heads=heads,
        num_kv_heads=heads, head_dim=hf.get("v_head_dim", 128), max_position=hf.get("max_position_embeddings", 4096),
        rope_theta=float(theta), rms_norm_eps=hf.get("rms_norm_eps", 1e-6), num_experts=experts,
        top_k=hf["num_experts_per_tok"] if experts else 0, moe_intermediate_size=hf.get("moe_intermediate_size", 0),
        intermediate_size=hf["intermediate_size"], norm_topk_prob=bool(hf.get("norm_topk_prob")),
        attention_bias=hf.get("attention_bias", False), act=hf.get("hidden_act", "silu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False), dense_layers=dense,
        q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], rope_scaling=scaling, rope_interleave=hf.get("rope_interleave", True),
        n_shared_experts=hf.get("n_shared_experts") or 0, routing=routing, num_expert_groups=n_group,
        num_mtp_layers=hf.get("num_nextn_predict_layers") or 0)


def canonical_name(name: str) -> str:
    """model.layers.3.mlp.experts.7.gate_proj.weight -> layers.3.mlp.experts.7.gate;
    model.layers.3.mlp.gate.e_score_correction_bias -> layers.3.mlp.gate_bias."""
    name = name.removeprefix("model.")
    if name.endswith(".e_score_correction_bias"):
        return name.removesuffix(".gate.e_score_correction_bias") + ".gate_bias"
    name = name.removesuffix(".weight")
    if ".experts." in name and ".shared_experts." not in name:
        for proj in ("gate", "up", "down"):
            name = name.replace(f".{proj}_proj", f".{proj}")
    return name


class DeepseekDecoderLayer(DecoderLayer):
    """MLA, then a dense MLP (the first layers) or routed experts plus shared experts."""

    attention_class = MLAttention
    # (first, *deps) -> context manager running the shared experts on a second stream after deps; set by
    # a graph runner that overlaps them with the routed experts (ascend: torchair enable_multistream_moe)
    shared_side_stream = None

    def __init__(self, cfg: DeepseekConfig, idx: int, rope, all2all, ps, dtype, kernels: Kernels = TORCH):
        super().__init__(cfg, idx, rope, all2all, ps, dtype, routing=cfg.routing, kernels=kernels)
        self.shared_experts = None
        if isinstance(self.mlp, FusedMoE) and cfg.n_shared_experts:
            # replicated over EP; split over the TP group like a dense MLP
            self.shared_experts = DenseMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts,
                                           ACTIVATIONS[cfg.act], ps, dtype, kernels)

    def load(self, rest: str, t: torch.Tensor) -> bool:
        if rest.startswith("mlp.shared_experts.") and self.shared_experts is not None:
            self.shared_experts.load(rest.removeprefix("mlp.shared_experts."), t)
            return True
        if rest == "mlp.gate_bias" and getattr(self.mlp, "bias", None) is not None:
            self.mlp.bias.data.copy_(t)
            return True
        return super().load(rest, t)

    def weight_names(self) -> set[str]:
        names = super().weight_names()
        if self.shared_experts is not None:
            names |= {f"mlp.shared_experts.{w}_proj" for w in ("gate", "up", "down")}
        if getattr(self.mlp, "bias", None) is not None:
            names.add("mlp.gate_bias")
        return names

    def forward(self, x, positions, meta):
        x = x + self.self_attn(self.input_layernorm(x), positions, meta)
        h = self.post_attention_layernorm(x)
        shared = None
        if self.shared_experts is not None and self.shared_side_stream is not None:
            with self.shared_side_stream(h):
                shared = self.shared_experts(h)
        out = self.mlp(h)
        if isinstance(self.mlp, FusedMoE) and self.mlp.tp_size > 1:
            out = _tp_all_reduce(out, self.ps)
        if self.shared_experts is not None:
            out = out + (shared if shared is not None else self.shared_experts(h))
        return x + out


class DeepseekForCausalLM(MoEForCausalLM):
    """The DeepSeek model; with ``cfg.use_mtp`` it also holds the checkpoint's first MTP layer
    (``mtp``: the deepseek_mtp draft model, layer index ``num_layers`` in the checkpoint)."""

    layer_class = DeepseekDecoderLayer

    def __init__(self, cfg: DeepseekConfig, all2all, dtype, ps=None, kernels: Kernels = TORCH):
        super().__init__(cfg, all2all, dtype, ps, kernels)
        self.mtp = None
        if cfg.use_mtp:
            layer = DeepseekDecoderLayer(cfg, cfg.num_layers, self.rope, all2all, self.layers[0].ps, dtype, kernels)
            self.mtp = DeepseekMTP(cfg, layer, dtype, kernels)

    @staticmethod
    def make_rope(cfg: DeepseekConfig, kernels: Kernels = TORCH):   # interleaved YaRN rotary: torch only
        return DeepseekRotary(cfg.qk_rope_head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling,
                              cfg.rope_interleave)

    def _layer_at(self, idx: int):
        if idx < self.cfg.num_layers:
            return super()._layer_at(idx)
        return self.mtp.layer if self.mtp is not None and idx == self.cfg.num_layers else None

    def kv_layers(self) -> list:
        return super().kv_layers() + ([self.mtp.layer.self_attn] if self.mtp is not None else [])

    def load_weight(self, name: str, t: torch.Tensor) -> bool:
        if self.mtp is not None and name.startswith(f"layers.{self.cfg.num_layers}."):
            if self.mtp.load_own(name.split(".", 2)[2], t):
                return True
        return super().load_weight(name, t)

    def required_names(self) -> set[str]:
        names = super().required_names()
        if self.mtp is not None:
            p = f"layers.{self.cfg.num_layers}."
            names |= {p + n for n in self.mtp.layer.weight_names() | self.mtp.own_names()}
        return names

    def wants(self, name: str) -> bool:
        if name.startswith("layers.") and self._layer_at(int(name.split(".")[1])) is None:
            return False          # MTP layers when no draft model is asked for (or beyond the first)
        return super().wants(name)


MODEL = DeepseekForCausalLM
