"""``--quantization fp8`` on CUDA: 128x128 block-scaled float8_e4m3 weights (DeepSeek-V3's scheme),
GEMMs in Triton that read the fp8 bytes: fp8_linear for the linears (activations quantized per
token and 128-wide group above its decode sizes, unquantized below, where the weight bytes bound
it), fp8_moe for the experts (the bf16 expert kernels reading fp8 tiles); a ``deep_gemm`` path is
not wired in yet.

Two sources:
- an fp8 checkpoint in DeepSeek-V3's layout (epplat.core.model.fp8_blocks): every tensor it has
  in fp8 is served in fp8: the routed experts, and the linears of the attention (MLA's q_proj or
  q_a/q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj; q/k/v/o of ordinary attention), the dense
  MLPs and the shared experts. MLA's absorbed decode multiplies by W_UK / W_UV, per-head slices
  of kv_b_proj, in a batched GEMM with no fp8 form, so kv_b_proj is also kept dequantized to bf16
  for it (as vLLM does); its prefill GEMM stays fp8. The startup log says so;
- a bf16/fp16/fp32 checkpoint, whose expert weights are quantized at load, layer by layer
  (attention, router, embeddings and lm_head stay in the model dtype).

Embeddings, norms, the router and lm_head are never fp8 (DeepSeek-V3 keeps them bf16).
A linear's fp8 weight replaces its parameter NAME (same shape, float8_e4m3fn) next to
NAME_scale_inv [ceil(out/128), ceil(in/128)]; the module's ``project`` runs fp8_linear for them.
"""

from __future__ import annotations

import functools
import logging
import math
import re

import torch
from torch import nn

from epplat.config import ConfigError
from epplat.core.model.decoder import Projections
from epplat.core.model.fp8_blocks import config_for, dequantize_blocks, expand_scale
from epplat.core.model.fp8_checkpoint import Fp8Checkpoint

logger = logging.getLogger(__name__)

_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)$")
_LINEAR = re.compile(r"^layers\.(\d+)\.(self_attn\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|"
                     r"kv_b_proj)|mlp\.(shared_experts\.)?(gate|up|down)_proj)$")
# checkpoint projection -> the parameter our modules keep it in
_FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up",
          "down_proj": "down"}


def _fp8_project(module: Projections, name: str, x: torch.Tensor) -> torch.Tensor:
    """``Projections.project`` for a module some of whose linears are fp8."""
    scale = module.fp8_scales.get(name)
    if scale is None:
        return Projections.project(module, name, x)
    from epplat.platforms.cuda.fp8_linear import fp8_linear
    return fp8_linear(x, getattr(module, name), scale, getattr(module, name + "_bias", None))


def _fp8_experts(*args, **kwargs):
    """fp8_moe.fp8_experts, imported when first run (loading a checkpoint needs no triton)."""
    from epplat.platforms.cuda.fp8_moe import fp8_experts
    return fp8_experts(*args, **kwargs)


def make_fp8_linear(module: Projections, param: str, weight: torch.Tensor, scale_inv: torch.Tensor) -> None:
    """Make linear `param` of `module` an fp8 one: weight float8_e4m3fn [out, in], scale_inv
    [ceil(out/128), ceil(in/128)] (kept as ``param``_scale_inv), run through fp8_linear."""
    setattr(module, param, nn.Parameter(weight, requires_grad=False))
    scale = nn.Parameter(scale_inv, requires_grad=False)
    setattr(module, param + "_scale_inv", scale)
    if "fp8_scales" not in module.__dict__:
        module.fp8_scales = {}
        module.project = functools.partial(_fp8_project, module)
    module.fp8_scales[param] = scale


class Fp8BlockQuant(Fp8Checkpoint):
    def __init__(self, cfg, canonical_name):
        super().__init__(cfg, canonical_name)
        if self.from_fp8:
            if self.block != 128:
                raise ConfigError(f"--quantization fp8 on cuda serves 128x128 weight blocks; the checkpoint has "
                                  f"{self.block}x{self.block}")
            others = sorted(n for n in self.scale_of if not (_EXPERT.match(n) or _LINEAR.match(n)))
            if others:
                raise ConfigError(f"--quantization fp8 serves fp8 linears of the attention, the MLPs and the experts, "
                                  f"but {others[0]} is fp8 in the checkpoint too")
        if cfg.parallel.enable_eplb:
            raise ConfigError("--enable-eplb moves expert weights between ranks, which --quantization fp8 "
                              "does not support yet")
        self.linears: dict[str, tuple] = {}      # canonical fp8 linear name -> (module, parameter name)

    def _moe_layers(self, model):
        from epplat.core.moe.layer import FusedMoE
        layers = list(model.layers) + ([model.mtp.layer] if getattr(model, "mtp", None) is not None else [])
        return [layer.mlp for layer in layers if isinstance(layer.mlp, FusedMoE)]

    @staticmethod
    def _target(model, name: str):
        """(module, parameter) that holds the checkpoint linear `name`."""
        _, idx, rest = name.split(".", 2)
        layer = model._layer_at(int(idx))
        part, _, proj = rest.rpartition(".")
        module = {"self_attn": getattr(layer, "self_attn", None), "mlp": getattr(layer, "mlp", None),
                  "mlp.shared_experts": getattr(layer, "shared_experts", None)}[part]
        param = proj if isinstance(getattr(module, proj, None), nn.Parameter) else _FUSED.get(proj)
        if not isinstance(module, Projections) or not isinstance(getattr(module, param or "", None), nn.Parameter):
            raise ConfigError(f"--quantization fp8: the checkpoint's fp8 {name} has no fp8 path in "
                              f"{type(module).__name__}")
        return module, param

    def process_model(self, model) -> None:
        if model.dtype != torch.bfloat16:
            raise ConfigError(f"--quantization fp8 runs with --dtype bfloat16, not {model.dtype}")
        for moe in self._moe_layers(model):
            hidden, inter = moe.w13.shape[1], moe.intermediate
            if hidden % 128 or inter % 128:
                raise ConfigError(f"--quantization fp8 needs hidden size and expert width (per TP rank) in multiples "
                                  f"of 128, not {hidden} and {inter}")
            if self.from_fp8:
                self._swap(moe, torch.zeros(moe.w13.shape, dtype=torch.float8_e4m3fn, device=moe.w13.device),
                           torch.zeros(moe.w2.shape, dtype=torch.float8_e4m3fn, device=moe.w2.device),
                           torch.zeros(moe.w13.shape[0], hidden // 128, 2 * inter // 128, device=moe.w13.device),
                           torch.zeros(moe.w2.shape[0], inter // 128, hidden // 128, device=moe.w2.device))
        for name in self.scale_of:
            if _LINEAR.match(name) and model.wants(name):
                self.linears[name] = self._target(model, name)
        for module, param in set(self.linears.values()):
            w = getattr(module, param)
            make_fp8_linear(module, param, torch.zeros(w.shape, dtype=torch.float8_e4m3fn, device=w.device),
                            torch.zeros(math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128), device=w.device))

    @staticmethod
    def _swap(moe, w13, w2, s13, s2):
        moe.w13 = nn.Parameter(w13, requires_grad=False)
        moe.w2 = nn.Parameter(w2, requires_grad=False)
        moe.w13_scale = nn.Parameter(s13, requires_grad=False)
        moe.w2_scale = nn.Parameter(s2, requires_grad=False)
        moe.experts = functools.partial(_fp8_experts, w13_scale=moe.w13_scale, w2_scale=moe.w2_scale)

    def load_pair(self, model, name, weight, scale) -> bool:
        if _EXPERT.match(name):
            return self._load_expert(model, name, weight, scale)
        module, param = self.linears[name]
        if not model.load_weight(name, weight):
            return False
        self._load_scale(model, module, param, name, scale)
        return True

    def _load_scale(self, model, module, param: str, name: str, scale: torch.Tensor) -> None:
        """Take this rank's blocks of `name`'s scale_inv through the model's own loading (which slices
        for TP and places q/k/v, gate/up): the scale expanded per element goes into a NaN-filled stand-in
        for the parameter, and each block of the stand-in must come out whole and uniform."""
        fp8 = module._parameters[param]
        stand_in = torch.full(fp8.shape, float("nan"), device=fp8.device)
        module._parameters[param] = nn.Parameter(stand_in, requires_grad=False)
        try:
            model.load_weight(name, expand_scale(scale, self.shape_of[name], 128))
        finally:
            module._parameters[param] = fp8
        o, i = stand_in.shape
        po, pi = -o % 128, -i % 128
        shape = ((o + po) // 128, 128, (i + pi) // 128, 128)
        blocks = torch.nn.functional.pad(stand_in, (0, pi, 0, po), value=float("nan")).view(shape)
        inside = torch.nn.functional.pad(torch.ones(o, i, dtype=torch.bool, device=fp8.device), (0, pi, 0, po))
        inside = inside.view(shape)
        written = ~blocks.isnan()
        hit = written.any(3).any(1)
        hi = blocks.nan_to_num(nan=-math.inf).amax((1, 3))
        lo = blocks.nan_to_num(nan=math.inf).amin((1, 3))
        if ((written != inside) & hit[:, None, :, None]).any() or (hi[hit] != lo[hit]).any():
            raise ValueError(f"this rank's part of {name} does not fall on whole 128x128 blocks of its "
                             "weight_scale_inv (e.g. a TP slice of 64 rows)")
        getattr(module, param + "_scale_inv").data[hit] = hi[hit]

    def _load_expert(self, model, name, weight, scale) -> bool:
        layer, expert, proj = _EXPERT.match(name).groups()
        moe = model._layer_at(int(layer)).mlp
        if not moe.load_expert_weight(int(expert), proj, weight):
            return False
        inter, sl = moe.intermediate, moe.slice
        rows = slice(sl.start // 128, sl.stop // 128)          # TP slices are whole 128-blocks
        for s in [s for s, e in enumerate(moe.local_logical_ids()) if e == int(expert)]:
            # checkpoint [out/128, in/128] -> ours, input-major [in/128, out/128]
            if proj == "gate":
                moe.w13_scale.data[s, :, :inter // 128].copy_(scale[rows].t())
            elif proj == "up":
                moe.w13_scale.data[s, :, inter // 128:].copy_(scale[rows].t())
            else:
                moe.w2_scale.data[s].copy_(scale[:, rows].t())
        return True

    def after_loading(self, model) -> None:
        super().after_loading(model)
        if not self.from_fp8:
            from epplat.platforms.cuda.fp8_moe import quantize
            for moe in self._moe_layers(model):        # one layer at a time: the bf16 copy of one layer at most
                q13, s13 = quantize(moe.w13.data)
                q2, s2 = quantize(moe.w2.data)
                self._swap(moe, q13, q2, s13, s2)
            torch.cuda.empty_cache()
            logger.info("--quantization fp8 on an unquantized checkpoint: the expert weights of %d MoE layers are "
                        "quantized at load (128x128 blocks); the other linears stay %s", len(self._moe_layers(model)),
                        str(model.dtype).removeprefix("torch."))
            return
        absorbed = 0
        for module, param in set(self.linears.values()):
            if param == "kv_b_proj" and hasattr(module, "w_kv_b"):
                module.w_kv_b = dequantize_blocks(module.kv_b_proj, module.kv_b_proj_scale_inv, 128, torch.bfloat16)
                absorbed += 1
        experts = sum(1 for n in self.scale_of if _EXPERT.match(n) and model.wants(n))
        logger.info("--quantization fp8: %d linears and %d expert weights served in fp8 (128x128 block scales, "
                    "Triton)%s", len(self.linears), experts,
                    f"; kv_b_proj of {absorbed} MLA layers also dequantized to bfloat16 for the absorbed decode "
                    "(W_UK/W_UV batched GEMMs have no fp8 form; as vLLM does), its prefill GEMM stays fp8"
                    if absorbed else "")


def write_fp8_checkpoint(src: str, dst: str, device: str = "cuda") -> None:
    """Copy a bf16/fp32 checkpoint to ``dst`` with its MoE expert weights in DeepSeek-V3's fp8
    layout (float8_e4m3fn weight + weight_scale_inv per 128x128 block); for tests and benchmarks.
    Quantizes on ``device`` (the same arithmetic as quantizing at load there)."""
    from epplat.core.model.checkpoint_rewrite import rewrite_checkpoint
    from epplat.platforms.cuda.fp8_moe import quantize

    def tensors(k, t, _):
        if ".experts." in k and k.endswith("_proj.weight"):
            q, s = quantize(t.to(device).t())          # [in, out] blocks -> store [out, in] and [out/128, in/128]
            return {k: q.t().contiguous().cpu(), k + "_scale_inv": s.t().contiguous().cpu()}
        return {k: t}
    rewrite_checkpoint(src, dst, tensors, lambda cfg: {**cfg, "quantization_config": config_for(128)})
