"""W8A8 dynamic quantization on Ascend (``--quantization ascend``): int8 weights (MoE experts and the
attention / dense MLP linears) with per-output-channel scales, int8 activations with per-token scales
computed at run time.

Checkpoint layout (msModelSlim's, as vllm-ascend reads it): ``quant_model_description.json``
maps every tensor name to its scheme ("W8A8_DYNAMIC" or "FLOAT"; plus ``model_quant_type``);
a W8A8_DYNAMIC linear ``X`` has ``X.weight`` int8 [out, in], ``X.weight_scale`` [out, 1] and
``X.weight_offset`` [out, 1] (optional; zero: symmetric). Weights may be in any *.safetensors files
(msModelSlim writes ``quant_model_weights-*.safetensors``). The MoE experts and the q/k/v/o and
dense MLP gate/up/down projections may be W8A8_DYNAMIC (q/k/v together, gate/up together: each
pair runs as one GEMM); embeddings, norms, the router gate and lm_head stay FLOAT, as msModelSlim
leaves them. Static "W8A8" (input_scale / deq_scale / quant_bias) is refused.

The GEMMs are torch_npu's: ``npu_dynamic_quant`` (per-token int8), then ``npu_grouped_matmul``
for the experts and ``npu_quant_matmul`` (int8 x [T, in] @ int8 w [in, out], per-channel
``scale``, ``pertoken_scale``) for the linears, as vllm-ascend's W8A8_DYNAMIC methods run them.
Under tensor parallelism a column-parallel linear (q/k/v, gate/up) keeps the rows of its weight
and scales that its rank computes; a row-parallel one (o, down) a column slice of its weight and
every scale.
"""

from __future__ import annotations

import functools
import json
import re
import types
from pathlib import Path

import torch
from torch import nn

from epplat.config import ConfigError
from epplat.core.ops import gated_act, linear
from epplat.core.model.quant import QuantMethod

DESCRIPTION = "quant_model_description.json"
SCHEME = "W8A8_DYNAMIC"
_META_KEYS = {"model_quant_type", "version", "metadata", "group_size", "optional", "kv_quant_type", "fa_quant_type",
              "reduce_quant_type"}
_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)(\.weight_scale|\.weight_offset)?$")
_LINEAR = re.compile(r"^layers\.(\d+)\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
                     r"(\.weight_scale|\.weight_offset)?$")
# checkpoint projection -> (module attribute of the layer, parameter it runs in, column-parallel)
_PROJ = {"q": ("self_attn", "qkv", True), "k": ("self_attn", "qkv", True), "v": ("self_attn", "qkv", True),
         "o": ("self_attn", "o_proj", False), "gate": ("mlp", "gate_up", True), "up": ("mlp", "gate_up", True),
         "down": ("mlp", "down", False)}
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
            if scheme == "W8A8":
                raise ConfigError(f"{DESCRIPTION}: {key} is static 'W8A8' (input_scale/deq_scale); --quantization "
                                  f"ascend serves {SCHEME} and FLOAT tensors")
            if scheme != SCHEME:
                raise ConfigError(f"{DESCRIPTION}: {key} is {scheme!r}; --quantization ascend serves {SCHEME} "
                                  "and FLOAT tensors")
            name = canonical_name(key)
            if not (_EXPERT.match(name) or _LINEAR.match(name)):
                raise ConfigError(f"{DESCRIPTION}: {key} is {SCHEME}; epplat's W8A8 quantizes the MoE experts and "
                                  "the attention and MLP projections, keep the embeddings, norms, router gate and "
                                  "lm_head FLOAT")
            self.quantized.add(name)
        if not self.quantized:
            raise ConfigError(f"{DESCRIPTION} marks no tensor {SCHEME}")
        self.nz = False

    # -- building the model ---------------------------------------------------------------------------
    def _moe_layers(self, model):
        from epplat.core.moe.layer import FusedMoE
        for i, layer in enumerate(model.layers, model.start):     # a pipeline stage holds layers start..end-1
            if isinstance(layer.mlp, FusedMoE) and f"layers.{i}.mlp.experts.0.gate" in self.quantized:
                yield i, layer.mlp

    def process_model(self, model) -> None:
        dtype = model.dtype
        if dtype not in (torch.bfloat16, torch.float16):
            # npu_dynamic_quant takes float16/bfloat16 only and npu_quant_matmul has no float32 output
            raise ConfigError(f"--quantization ascend computes in bfloat16 or float16 (torch_npu's int8 ops take no "
                              f"{str(dtype).removeprefix('torch.')}); use --dtype bfloat16")
        # npu_grouped_matmul's per-token int8 path: a bf16 scale with bf16 output, an fp32 scale with fp16 output
        scale_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
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

        for module, param, _ in self._linears(model):
            w = getattr(module, param)
            setattr(module, param, nn.Parameter(torch.zeros(w.shape, dtype=torch.int8, device=w.device),
                                                requires_grad=False))
            setattr(module, param + "_scale", nn.Parameter(torch.zeros(w.shape[0], dtype=scale_dtype, device=w.device),
                                                           requires_grad=False))
            module.project = types.MethodType(w8a8_project, module)

    def _linears(self, model):
        """(module, parameter name, its checkpoint projections) of every quantized linear; checks the fused
        pairs share one scheme and that the names fit the model's layers."""
        groups = {}
        for name in self.quantized:
            m = _LINEAR.match(name)
            if m:
                proj = m.group(3) or m.group(4)
                attr, param, _ = _PROJ[proj]
                groups.setdefault((int(m.group(1)), attr, param), []).append(proj)
        for (i, attr, param), projs in sorted(groups.items()):
            if model._layer_at(i) is None and i < model.cfg.num_layers:
                continue                                    # another pipeline stage's layer
            module = getattr(model._layer_at(i), attr, None)
            if module is None or not hasattr(module, param):
                raise ConfigError(f"{DESCRIPTION}: layer {i} has no {'dense MLP' if attr == 'mlp' else attr} for "
                                  f"its {SCHEME} {projs[0]}_proj")
            fused = [p for p, v in _PROJ.items() if v[1] == param]
            if sorted(projs) != sorted(fused):
                missing = sorted(set(fused) - set(projs))[0]
                raise ConfigError(f"{DESCRIPTION}: layer {i} quantizes {sorted(projs)[0]}_proj but not "
                                  f"{missing}_proj; {'/'.join(fused)} run as one GEMM and need one scheme")
            yield module, param, projs

    def owns(self, name: str) -> bool:
        m = _EXPERT.match(name)
        if m:
            return f"layers.{m.group(1)}.mlp.experts.{m.group(2)}.{m.group(3)}" in self.quantized
        m = _LINEAR.match(name)
        return bool(m) and f"layers.{m.group(1)}.{m.group(2)}" in self.quantized

    def load_weight(self, model, name: str, tensor: torch.Tensor) -> bool:
        if _LINEAR.match(name):
            return self._load_linear(model, name, tensor)
        layer, expert, proj, suffix = _EXPERT.match(name).groups()
        if model._layer_at(int(layer)) is None:
            return False                                    # another pipeline stage's layer
        moe = model._layer_at(int(layer)).mlp
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

    def _load_linear(self, model, name: str, tensor: torch.Tensor) -> bool:
        m = _LINEAR.match(name)
        layer, proj, suffix = model._layer_at(int(m.group(1))), m.group(3) or m.group(4), m.group(5)
        if layer is None:
            return False                                    # another pipeline stage's layer
        attr, param, column = _PROJ[proj]
        module = getattr(layer, attr)
        if not suffix:
            if tensor.dtype != torch.int8:
                raise ValueError(f"{DESCRIPTION} says {SCHEME} but the tensor is {tensor.dtype}, not int8")
            module.load(f"{proj}_proj", tensor)
            return True
        c = model.cfg
        full = {"q": c.num_heads * c.head_dim, "k": c.num_kv_heads * c.head_dim, "v": c.num_kv_heads * c.head_dim,
                "o": c.hidden_size, "gate": c.intermediate_size, "up": c.intermediate_size, "down": c.hidden_size}[proj]
        if tensor.shape not in ((full, 1), (full,)):
            raise ValueError(f"expected shape [{full}, 1], got {list(tensor.shape)}")
        if suffix == ".weight_offset":
            if bool(tensor.ne(0).any()):
                raise ValueError(f"{SCHEME} weights are symmetric; a non-zero weight_offset is not supported")
            return True
        scale = getattr(module, param + "_scale")
        if column:      # this rank's output rows, as the weight's
            module.load(f"{proj}_proj", tensor.reshape(-1), into=scale)
        else:           # row-parallel: every output channel on every rank
            scale.data.copy_(tensor.reshape(-1))
        return True

    def required_names(self, model) -> set[str]:
        experts = {f"layers.{i}.mlp.experts.{e}.{p}.weight_scale" for i, moe in self._moe_layers(model)
                   for e in set(moe.local_logical_ids()) for p in ("gate", "up", "down")}
        return experts | {n + ".weight_scale" for n in self.quantized
                          if _LINEAR.match(n) and model._layer_at(int(_LINEAR.match(n).group(1))) is not None}

    def after_loading(self, model) -> None:
        from epplat.platforms.ascend.ascend_config import current
        for module, param, _ in self._linears(model):      # npu_quant_matmul's x2 is [in, out]
            w = getattr(module, param)
            w.data = w.data.t().contiguous()
        if not current().enable_weight_nz_layout:
            return
        import torch_npu
        for _, moe in self._moe_layers(model):     # FRACTAL_NZ: the layout the NPU's int8 GEMMs read fastest
            moe.w13.data = torch_npu.npu_format_cast(moe.w13.data, ACL_FORMAT_FRACTAL_NZ)
            moe.w2.data = torch_npu.npu_format_cast(moe.w2.data, ACL_FORMAT_FRACTAL_NZ)
        for module, param, _ in self._linears(model):
            w = getattr(module, param)
            w.data = torch_npu.npu_format_cast(w.data, ACL_FORMAT_FRACTAL_NZ)


def w8a8_project(module, name: str, x: torch.Tensor) -> torch.Tensor:
    """``Projections.project`` of a module with W8A8 linears: int8 parameters through w8a8_linear,
    float ones (a scheme msModelSlim left FLOAT) as before."""
    w, bias = getattr(module, name), getattr(module, name + "_bias", None)
    if w.dtype != torch.int8:
        return linear(x, w, bias, module.kernels)
    return w8a8_linear(x, w, getattr(module, name + "_scale"), bias)


def w8a8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
    """x [T, in] -> [T, out] in x's dtype: x quantized per token, times int8 w [in, out] (int32 sums),
    times the per-output-channel scale [out] and the per-token scale; bias added in x's dtype."""
    import torch_npu
    if x.shape[0] == 0:   # npu_quant_matmul takes no empty x1 (its docs); an idle DP rank's dummy step has no token
        out = x.new_zeros((0, w.shape[1]))
        return out if bias is None else out + bias
    xq, x_scale = torch_npu.npu_dynamic_quant(x)
    out = torch_npu.npu_quant_matmul(xq, w, scale, pertoken_scale=x_scale, output_dtype=x.dtype)
    return out if bias is None else out + bias


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
