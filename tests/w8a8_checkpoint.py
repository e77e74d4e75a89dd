"""Test helper: turn a float checkpoint into msModelSlim's W8A8_DYNAMIC layout (what `--quantization ascend`
reads), quantizing the MoE expert weights and the attention / dense MLP projections per output channel
(optionally turning MoE layers into dense ones first); and the plain-torch integer arithmetic those
weights are served with, as the reference for the engine's NPU path."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

EXPERT_WEIGHT = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
# what msModelSlim quantizes: the experts, q/k/v/o and the dense MLPs (not embeddings, norms, router, lm_head)
LINEAR_WEIGHT = re.compile(r"(\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)|\.self_attn\.[qkvo]_proj"
                           r"|\.mlp\.(gate|up|down)_proj)\.weight$")


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (int8 [out, in], float32 scale [out, 1]), symmetric."""
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(w.float() / scale).clamp(-128, 127).to(torch.int8), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [t, k] -> (int8 values, float32 scale [t]): scale = max|x| / 127, q = round(x / scale)."""
    scale = x.float().abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    return torch.round(x.float() / scale[:, None]).clamp(-128, 127).to(torch.int8), scale


def _float_tensors(src: Path, dense_layers, inter: int, hidden: int):
    """The checkpoint's tensors in file order; the MoE MLPs of `dense_layers` replaced by random dense ones."""
    g = torch.Generator().manual_seed(7)
    for path in sorted(Path(src).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                m = re.match(r"model\.layers\.(\d+)\.mlp\.", key)
                if m and int(m.group(1)) in dense_layers:
                    if key.endswith(".mlp.gate.weight"):        # once per layer
                        p, dt = key[: -len("gate.weight")], f.get_tensor(key).dtype
                        for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                            ("down_proj", (hidden, inter))):
                            w = torch.randn(shape, generator=g) / shape[1] ** 0.5
                            yield f"{p}{name}.weight", w.to(dt)
                    continue
                yield key, f.get_tensor(key)


def write_w8a8_checkpoint(src: Path, dst: Path, quantize=LINEAR_WEIGHT, dense_layers=()) -> Path:
    """`dense_layers`: layers whose MoE MLP becomes a random dense MLP (config.json's mlp_only_layers)."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors, desc = {}, {"model_quant_type": "W8A8_DYNAMIC"}
    hf = json.loads((Path(src) / "config.json").read_text())
    for key, t in _float_tensors(src, set(dense_layers), hf["intermediate_size"], hf["hidden_size"]):
        if quantize.search(key):
            q, s = quantize_per_channel(t)
            base = key[: -len(".weight")]
            tensors[key], tensors[base + ".weight_scale"] = q, s
            tensors[base + ".weight_offset"] = torch.zeros_like(s)
            for k in (key, base + ".weight_scale", base + ".weight_offset"):
                desc[k] = "W8A8_DYNAMIC"
        else:
            tensors[key] = t
            desc[key] = "FLOAT"
    save_file(tensors, str(dst / "quant_model_weights-00001-of-00001.safetensors"))
    (dst / "quant_model_description.json").write_text(json.dumps(desc, indent=1))
    for f in Path(src).iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json" and f.is_file():
            shutil.copy(f, dst / f.name)
    if dense_layers:
        hf["mlp_only_layers"] = sorted(dense_layers)
        (dst / "config.json").write_text(json.dumps(hf, indent=2))
    return dst


def reference_w8a8_linear(x, wq, ws, bias=None) -> torch.Tensor:
    """Token by token: int8 x (per-token scale) times int8 wq [out, in] (per-channel scale ws [out, 1]),
    summed in int64, scaled in float32, in x's dtype (+ bias)."""
    out = torch.empty(x.shape[0], wq.shape[0], dtype=x.dtype)
    for t in range(x.shape[0]):
        xq, xs = quantize_per_token(x[t:t + 1])
        acc = (xq.long() @ wq.long().t()).float()
        out[t] = (acc * ws.float().reshape(1, -1) * xs[:, None]).to(x.dtype)[0]
    return out if bias is None else out + bias


def reference_w8a8_experts(x, topk_ids, topk_weights, w13q, w13s, w2q, w2s) -> torch.Tensor:
    """Token by token, expert by expert (ascending): int8 activations with per-token scales times int8
    weights with per-channel scales, accumulated in int64. w13q int8 [E, H, 2I], w13s [E, 2I]; w2q [E, I, H]."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        acc = None
        for e in sorted(topk_ids[t].tolist()):
            k = topk_ids[t].tolist().index(e)
            xq, xs = quantize_per_token(x[t:t + 1])
            h = (xq.long() @ w13q[e].long()).float() * w13s[e].float()[None, :] * xs[:, None]
            h = h.to(x.dtype)
            inter = h.shape[1] // 2
            a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
            aq, as_ = quantize_per_token(a)
            o = ((aq.long() @ w2q[e].long()).float() * w2s[e].float()[None, :] * as_[:, None]).to(x.dtype)
            o = o * topk_weights[t, k].to(x.dtype)
            acc = o if acc is None else acc + o
        out[t] = acc[0]
    return out


class _ReferenceW8A8Linear(torch.nn.Module):
    def __init__(self, wq, ws):
        super().__init__()
        self.wq, self.ws = wq, ws

    def forward(self, x):
        return reference_w8a8_linear(x.reshape(-1, x.shape[-1]), self.wq, self.ws).reshape(*x.shape[:-1], -1)


def reference_w8a8_greedy(w8a8_dir: Path, workdir: Path, prompts: list[list[int]], max_tokens: int,
                          dtype=torch.float16) -> list[list[int]]:
    """The oracle for a W8A8 checkpoint: transformers' model of the same architecture (in ``dtype``) whose
    quantized projections and experts compute with the integer arithmetic above; greedy new tokens
    (``ignore_eos``), one prompt at a time."""
    from transformers import AutoModelForCausalLM
    with safe_open(str(next(Path(w8a8_dir).glob("*.safetensors"))), "pt") as f:
        ck = {k: f.get_tensor(k) for k in f.keys()}
    # a float checkpoint for transformers to load (the quantized weights dequantized; every
    # quantized module below is then replaced by the integer arithmetic on the int8 weights)
    workdir.mkdir(parents=True, exist_ok=True)
    save_file({k: (t.float() * ck[k[: -len(".weight")] + ".weight_scale"] if t.dtype == torch.int8 else t)
               for k, t in ck.items() if not k.endswith((".weight_scale", ".weight_offset"))},
              str(workdir / "model.safetensors"))
    shutil.copy(Path(w8a8_dir) / "config.json", workdir / "config.json")
    model = AutoModelForCausalLM.from_pretrained(workdir, dtype=dtype).eval()
    quant = lambda key: (ck[key + ".weight"], ck[key + ".weight_scale"].reshape(-1))  # noqa: E731
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        for name in "qkvo":
            setattr(layer.self_attn, f"{name}_proj", _ReferenceW8A8Linear(*quant(p + f"self_attn.{name}_proj")))
        if hasattr(layer.mlp, "experts"):
            e = range(layer.mlp.experts.num_experts)
            gu = [(quant(p + f"mlp.experts.{j}.gate_proj"), quant(p + f"mlp.experts.{j}.up_proj")) for j in e]
            w13q = torch.stack([torch.cat([g[0], u[0]]).t() for g, u in gu])
            w13s = torch.stack([torch.cat([g[1], u[1]]) for g, u in gu])
            down = [quant(p + f"mlp.experts.{j}.down_proj") for j in e]
            w2q, w2s = torch.stack([d[0].t() for d in down]), torch.stack([d[1] for d in down])
            layer.mlp.experts.forward = lambda x, ids, w, a=(w13q, w13s, w2q, w2s): reference_w8a8_experts(x, ids, w, *a)
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                setattr(layer.mlp, name, _ReferenceW8A8Linear(*quant(p + f"mlp.{name}")))
    out = []
    for ids in prompts:
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                               pad_token_id=model.generation_config.pad_token_id)
        out.append(g[0, len(ids):].tolist())
    return out
