"""W8A8 dynamic quantization on Ascend (``--quantization ascend``): int8 MoE expert weights with
per-output-channel scales, int8 activations with per-token scales computed at run time.

Checkpoint layout (msModelSlim's, as vllm-ascend reads it): ``quant_model_description.json``
maps every tensor name to its scheme ("W8A8_DYNAMIC" or "FLOAT"; plus ``model_quant_type``);
a W8A8_DYNAMIC linear ``X`` has ``X.weight`` int8 [out, in], ``X.weight_scale`` [out, 1] and
``X.weight_offset`` [out, 1] (zero: symmetric). Weights may be in any *.safetensors files
(msModelSlim writes ``quant_model_weights-*.safetensors``). epplat quantizes the MoE experts,
where EP serving keeps its weight bytes; every other tensor must be FLOAT.

The expert GEMMs are torch_npu's: ``npu_dynamic_quant`` (per-token int8) and
``npu_grouped_matmul`` with int8 weights, weight scales and per-token scales, as
vllm-ascend's W8A8_DYNAMIC MoE method runs them.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
from torch import nn

from epplat.config import ConfigError
from epplat.core.model.layers import gated_act
from epplat.core.model.quant import QuantMethod

DESCRIPTION = "quant_model_description.json"
SCHEME = "W8A8_DYNAMIC"
_META_KEYS = {"model_quant_type", "version", "metadata", "group_size", "optional", "kv_quant_type", "fa_quant_type",
              "reduce_quant_type"}
_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)(\.weight_scale|\.weight_offset)?$")
ACL_FORMAT_FRACTAL_NZ = 29


class AscendW8A8(QuantMethod):
    name = "ascend"

    def __init__(self, cfg, canonical_name):
        super().__init__(cfg, canonical_name)
        path = Path(cfg.model.model) / DESCRIPTION
        if not path.is_file():
            raise ConfigError(f"--quantization ascend needs {DESCRIPTION} (msModelSlim's W8A8 layout) in "
                              f"{cfg.model.model}")
        try:
            desc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(desc, dict):
            raise ConfigError(f"{path} must be a JSON object")
        if cfg.parallel.enable_eplb:
            raise ConfigError("--enable-eplb moves expert weights between ranks, which W8A8 (--quantization ascend) "
                              "does not support yet")
        self.quantized: set[str] = set()       # canonical names of the int8 expert weights
        for key, scheme in desc.items():
            if key in _META_KEYS or not key.endswith(".weight"):
                continue
            if scheme == "FLOAT":
                continue
            if scheme != SCHEME:
                raise ConfigError(f"{DESCRIPTION}: {key} is {scheme!r}; --quantization ascend serves {SCHEME} "
                                  "and FLOAT tensors")
            name = canonical_name(key)
            if not _EXPERT.match(name):
                raise ConfigError(f"{DESCRIPTION}: {key} is {SCHEME}, but epplat's W8A8 quantizes the MoE expert "
                                  "weights only; keep the other tensors FLOAT")
            self.quantized.add(name)
        if not self.quantized:
            raise ConfigError(f"{DESCRIPTION} marks no tensor {SCHEME}")
        self.nz = False

    # -- building the model ---------------------------------------------------------------------------
    def _moe_layers(self, model):
        from epplat.core.moe.layer import FusedMoE
        for i, layer in enumerate(model.layers):
            if isinstance(layer.mlp, FusedMoE) and f"layers.{i}.mlp.experts.0.gate" in self.quantized:
                yield i, layer.mlp

    def process_model(self, model) -> None:
        scale_dtype = torch.bfloat16 if model.embed_tokens.dtype == torch.bfloat16 else torch.float32
        for i, moe in self._moe_layers(model):
            missing = [f"layers.{i}.mlp.experts.{e}.{p}" for e in range(moe.gate.shape[0]) for p in ("gate", "up", "down")
                       if f"layers.{i}.mlp.experts.{e}.{p}" not in self.quantized]
            if missing:
                raise ConfigError(f"{DESCRIPTION}: layer {i} quantizes some experts but not {missing[0]}")
            dev = moe.w13.device
            moe.w13 = nn.Parameter(torch.zeros(moe.w13.shape, dtype=torch.int8, device=dev), requires_grad=False)
            moe.w2 = nn.Parameter(torch.zeros(moe.w2.shape, dtype=torch.int8, device=dev), requires_grad=False)
            moe.w13_scale = nn.Parameter(torch.zeros(moe.w13.shape[0], moe.w13.shape[2], dtype=scale_dtype, device=dev),
                                         requires_grad=False)
            moe.w2_scale = nn.Parameter(torch.zeros(moe.w2.shape[0], moe.w2.shape[2], dtype=scale_dtype, device=dev),
                                        requires_grad=False)
            moe.experts = functools.partial(w8a8_experts, w13_scale=moe.w13_scale, w2_scale=moe.w2_scale)

    def owns(self, name: str) -> bool:
        m = _EXPERT.match(name)
        return bool(m) and f"layers.{m.group(1)}.mlp.experts.{m.group(2)}.{m.group(3)}" in self.quantized

    def load_weight(self, model, name: str, tensor: torch.Tensor) -> bool:
        layer, expert, proj, suffix = _EXPERT.match(name).groups()
        moe = model.layers[int(layer)].mlp
        if not suffix:
            if tensor.dtype != torch.int8:
                raise ValueError(f"{DESCRIPTION} says {SCHEME} but the tensor is {tensor.dtype}, not int8")
            return moe.load_expert_weight(int(expert), proj, tensor)
        out = moe.w13.shape[2] // 2 if proj != "down" else moe.w2.shape[2]
        full = moe.intermediate * moe.tp_size if proj != "down" else out
        if tensor.shape not in ((full, 1), (full,)):
            raise ValueError(f"expected shape [{full}, 1], got {list(tensor.shape)}")
        if suffix == ".weight_offset":
            if bool(tensor.ne(0).any()):
                raise ValueError(f"{SCHEME} weights are symmetric; a non-zero weight_offset is not supported")
            return any(e == int(expert) for e in moe.local_logical_ids())
        scale = tensor.reshape(-1)
        slots = [s for s, e in enumerate(moe.local_logical_ids()) if e == int(expert)]
        i = moe.intermediate
        for s in slots:
            if proj == "gate":
                moe.w13_scale.data[s, :i].copy_(scale[moe.slice])
            elif proj == "up":
                moe.w13_scale.data[s, i:].copy_(scale[moe.slice])
            else:
                moe.w2_scale.data[s].copy_(scale)
        return bool(slots)

    def required_names(self, model) -> set[str]:
        return {f"layers.{i}.mlp.experts.{e}.{p}{suffix}" for i, moe in self._moe_layers(model)
                for e in set(moe.local_logical_ids()) for p in ("gate", "up", "down")
                for suffix in (".weight_scale", ".weight_offset")}

    def after_loading(self, model) -> None:
        from epplat.platforms.ascend.ascend_config import current
        if not current().enable_weight_nz_layout:
            return
        import torch_npu
        for _, moe in self._moe_layers(model):     # FRACTAL_NZ: the layout the NPU's int8 GEMMs read fastest
            moe.w13.data = torch_npu.npu_format_cast(moe.w13.data, ACL_FORMAT_FRACTAL_NZ)
            moe.w2.data = torch_npu.npu_format_cast(moe.w2.data, ACL_FORMAT_FRACTAL_NZ)


def w8a8_experts(x, topk_ids, topk_weights, w13, w2, act, *, w13_scale, w2_scale) -> torch.Tensor:
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]) with int8 GEMMs; x: [R, H], ids/weights [R, K] (local ids, -1 =
    elsewhere), w13 int8 [E, H, 2I], w2 int8 [E, I, H], scales [E, 2I] / [E, H]. Outputs are summed in
    ascending expert order, as the reference experts do."""
    import torch_npu
    rows, k = topk_ids.shape
    hidden, num_experts = x.shape[1], w13.shape[0]
    ids, perm = topk_ids.sort(dim=1)
    weights = topk_weights.gather(1, perm).reshape(-1)
    key = ids.reshape(-1).clone()
    key[key < 0] = num_experts
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)
    valid = order[: rows * k - int(counts[num_experts])]
    group_list = counts[:num_experts].cumsum(0)
    xq, x_scale = torch_npu.npu_dynamic_quant(x)
    rows_of = valid // k
    gmm = functools.partial(torch_npu.npu_grouped_matmul, split_item=2, group_type=0, group_list_type=0,
                            group_list=group_list, output_dtype=x.dtype)
    h = gmm([xq.index_select(0, rows_of)], [w13], scale=[w13_scale], per_token_scale=[x_scale.index_select(0, rows_of)])[0]
    hq, h_scale = torch_npu.npu_dynamic_quant(gated_act(h, act))
    h = gmm([hq], [w2], scale=[w2_scale], per_token_scale=[h_scale])[0]
    h = h * weights.index_select(0, valid)[:, None].to(x.dtype)
    buf = x.new_zeros((rows * k, hidden))
    buf.index_copy_(0, valid, h)
    buf = buf.view(rows, k, hidden)
    out = buf[:, 0]
    for j in range(1, k):
        out = out + buf[:, j]
    return out
