"""``--quantization fp8`` on CUDA: MoE expert weights in float8_e4m3 with one scale per 128x128
block, activations quantized per token and 128-wide group at run time (DeepSeek-V3's scheme),
expert GEMMs in Triton (fp8_moe); a ``deep_gemm`` path is not wired in yet.

Two sources:
- an fp8 checkpoint in DeepSeek-V3's layout: ``config.json`` has ``quantization_config``
  ``{"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}``
  and every quantized linear ``X`` has ``X.weight`` float8_e4m3fn [out, in] and
  ``X.weight_scale_inv`` float32 [ceil(out/128), ceil(in/128)] (w = weight * scale_inv);
- a bf16/fp16/fp32 checkpoint, whose expert weights are quantized at load, layer by layer.

Quantized here: the MoE experts (where a MoE model keeps its bytes). Attention, router,
embeddings and lm_head stay in the model dtype; an fp8 checkpoint that quantizes other
tensors is refused with one line.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
from torch import nn

from epplat.config import ConfigError
from epplat.core.model.quant import QuantMethod

_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)(\.weight_scale_inv)?$")


def _checkpoint_scales(model_dir: str) -> set[str]:
    """Names (as written) of every ``*.weight_scale_inv`` tensor in the checkpoint's shards."""
    from epplat.core.model.loader import checkpoint_files
    names = set()
    for path in checkpoint_files(model_dir):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        names |= {k for k in header if k.endswith(".weight_scale_inv")}
    return names


class Fp8BlockQuant(QuantMethod):
    name = "fp8"

    def __init__(self, cfg, canonical_name):
        super().__init__(cfg, canonical_name)
        qc = cfg.model.hf_config().get("quantization_config")
        self.from_fp8 = bool(qc)
        if qc:
            if qc.get("quant_method") != "fp8":
                raise ConfigError(f"--quantization fp8: the checkpoint is quantized with {qc.get('quant_method')!r}")
            if list(qc.get("weight_block_size") or []) != [128, 128] or qc.get("activation_scheme", "dynamic") != "dynamic":
                raise ConfigError("--quantization fp8 serves 128x128 block-scaled weights with dynamic activations; "
                                  f"the checkpoint has weight_block_size {qc.get('weight_block_size')}, "
                                  f"activation_scheme {qc.get('activation_scheme')!r}")
            others = sorted(n for n in map(canonical_name, _checkpoint_scales(cfg.model.model))
                            if not _EXPERT.match(n))
            if others:
                raise ConfigError(f"--quantization fp8: only MoE expert weights may be fp8, but {others[0]} is "
                                  "(dequantize the other tensors to bf16)")
        if cfg.parallel.enable_eplb:
            raise ConfigError("--enable-eplb moves expert weights between ranks, which --quantization fp8 "
                              "does not support yet")

    def _moe_layers(self, model):
        from epplat.core.moe.layer import FusedMoE
        return [layer.mlp for layer in model.layers if isinstance(layer.mlp, FusedMoE)]

    def process_model(self, model) -> None:
        if model.embed_tokens.dtype != torch.bfloat16:
            raise ConfigError(f"--quantization fp8 runs with --dtype bfloat16, not {model.embed_tokens.dtype}")
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

    @staticmethod
    def _swap(moe, w13, w2, s13, s2):
        from epplat.platforms.cuda.fp8_moe import fp8_experts
        moe.w13 = nn.Parameter(w13, requires_grad=False)
        moe.w2 = nn.Parameter(w2, requires_grad=False)
        moe.w13_scale = nn.Parameter(s13, requires_grad=False)
        moe.w2_scale = nn.Parameter(s2, requires_grad=False)
        moe.experts = functools.partial(fp8_experts, w13_scale=moe.w13_scale, w2_scale=moe.w2_scale)

    def owns(self, name: str) -> bool:
        return self.from_fp8 and bool(_EXPERT.match(name))

    def load_weight(self, model, name: str, tensor: torch.Tensor) -> bool:
        layer, expert, proj, scale = _EXPERT.match(name).groups()
        moe = model.layers[int(layer)].mlp
        if not scale:
            if tensor.dtype != torch.float8_e4m3fn:
                raise ValueError(f"quantization_config says fp8 but the tensor is {tensor.dtype}")
            return moe.load_expert_weight(int(expert), proj, tensor)
        inter, sl = moe.intermediate, moe.slice
        rows = slice(sl.start // 128, sl.stop // 128)          # TP slices are whole 128-blocks
        slots = [s for s, e in enumerate(moe.local_logical_ids()) if e == int(expert)]
        for s in slots:   # checkpoint [out/128, in/128] -> ours, input-major [in/128, out/128]
            if proj == "gate":
                moe.w13_scale.data[s, :, :inter // 128].copy_(tensor[rows].t())
            elif proj == "up":
                moe.w13_scale.data[s, :, inter // 128:].copy_(tensor[rows].t())
            else:
                moe.w2_scale.data[s].copy_(tensor[:, rows].t())
        return bool(slots)

    def required_names(self, model) -> set[str]:
        if not self.from_fp8:
            return set()
        return {f"layers.{i}.mlp.experts.{e}.{p}.weight_scale_inv" for i, layer in enumerate(model.layers)
                if layer.mlp in self._moe_layers(model)
                for e in set(layer.mlp.local_logical_ids()) for p in ("gate", "up", "down")}

    def after_loading(self, model) -> None:
        if self.from_fp8:
            return
        from epplat.platforms.cuda.fp8_moe import quantize
        for moe in self._moe_layers(model):        # one layer at a time: the bf16 copy of one layer at most
            q13, s13 = quantize(moe.w13.data)
            q2, s2 = quantize(moe.w2.data)
            self._swap(moe, q13, q2, s13, s2)
        torch.cuda.empty_cache()


def write_fp8_checkpoint(src: str, dst: str, device: str = "cuda") -> None:
    """Copy a bf16/fp32 checkpoint to ``dst`` with its MoE expert weights in DeepSeek-V3's fp8
    layout (float8_e4m3fn weight + weight_scale_inv per 128x128 block); for tests and benchmarks.
    Quantizes on ``device`` (the same arithmetic as quantizing at load there)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from epplat.core.model.loader import checkpoint_files
    from epplat.platforms.cuda.fp8_moe import quantize
    src_p, dst_p = Path(src), Path(dst)
    dst_p.mkdir(parents=True, exist_ok=True)
    for f in src_p.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst_p / f.name)
    cfg = json.loads((src_p / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    (dst_p / "config.json").write_text(json.dumps(cfg, indent=2))
    out = {}
    for path in checkpoint_files(src):
        for k, t in load_file(str(path)).items():
            if ".experts." in k and k.endswith("_proj.weight"):
                q, s = quantize(t.to(device).t())          # [in, out] blocks -> store [out, in] and [out/128, in/128]
                out[k], out[k + "_scale_inv"] = q.t().contiguous().cpu(), s.t().contiguous().cpu()
            else:
                out[k] = t
    save_file(out, str(dst_p / "model.safetensors"))
