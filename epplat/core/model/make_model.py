"""``epplat make-model``: random-weight MoE checkpoints in the Hugging Face hub layout.

Writes config.json, generation_config.json, tokenizer files and safetensors shards
with the per-expert tensor names real checkpoints use, so transformers, vLLM and
epplat all load them. Each tensor is drawn from its own seeded generator (seed and
name), one shard at a time, so the weights do not depend on sharding and a large
model never sits in memory whole.
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from pathlib import Path

ARCHS = ("qwen3_moe", "mixtral")
_DTYPES = ("float32", "bfloat16", "float16")


def _config(arch, layers, hidden, experts, top_k, heads, kv_heads, head_dim, moe_inter, inter, vocab,
            max_position, dtype, ids) -> dict:
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, hidden_act="silu",
                  max_position_embeddings=max_position, rope_theta=1000000.0, attention_dropout=0.0,
                  initializer_range=0.02, tie_word_embeddings=False, use_cache=True, torch_dtype=dtype,
                  bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                  num_experts_per_tok=top_k, output_router_logits=False, router_aux_loss_coef=0.001,
                  sliding_window=None)
    if arch == "qwen3_moe":
        return dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=experts,
                    moe_intermediate_size=moe_inter, intermediate_size=inter, decoder_sparse_step=1,
                    mlp_only_layers=[], norm_topk_prob=True, rms_norm_eps=1e-6, attention_bias=False,
                    use_sliding_window=False, max_window_layers=layers, rope_scaling=None, **common)
    return dict(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=experts,
                intermediate_size=moe_inter, rms_norm_eps=1e-5, **common)


def tensor_specs(arch: str, c: dict) -> list[tuple[str, tuple, str]]:
    """(name, shape, init) of every tensor; init is 'norm' (around 1), 'embed' or 'linear'."""
    h, d = c["hidden_size"], c["head_dim"]
    qh, kvh, v = c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]
    moe = "mlp" if arch == "qwen3_moe" else "block_sparse_moe"
    inter = c["moe_intermediate_size"] if arch == "qwen3_moe" else c["intermediate_size"]
    experts = c.get("num_experts") or c["num_local_experts"]
    names = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}[arch]
    specs = [("model.embed_tokens.weight", (v, h), "embed")]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (h,), "norm"), (p + "post_attention_layernorm.weight", (h,), "norm"),
                  (p + "self_attn.q_proj.weight", (qh * d, h), "linear"),
                  (p + "self_attn.k_proj.weight", (kvh * d, h), "linear"),
                  (p + "self_attn.v_proj.weight", (kvh * d, h), "linear"),
                  (p + "self_attn.o_proj.weight", (h, qh * d), "linear")]
        if arch == "qwen3_moe":
            specs += [(p + "self_attn.q_norm.weight", (d,), "norm"), (p + "self_attn.k_norm.weight", (d,), "norm")]
        specs.append((p + f"{moe}.gate.weight", (experts, h), "linear"))
        for e in range(experts):
            q = p + f"{moe}.experts.{e}."
            specs += [(q + names[0] + ".weight", (inter, h), "linear"), (q + names[1] + ".weight", (inter, h), "linear"),
                      (q + names[2] + ".weight", (h, inter), "linear")]
    specs += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (v, h), "linear")]
    return specs


def _tensor(name, shape, init, seed, dtype):
    import torch
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF)
    if init == "norm":
        t = 1.0 + 0.1 * torch.randn(shape, generator=g)
    elif init == "embed":
        t = torch.randn(shape, generator=g)
    else:  # keeps activations O(1) so random models give varied, non-degenerate tokens
        t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
    return t.to(getattr(torch, dtype)).contiguous()


def make_model(arch: str, outdir, *, layers: int = 2, hidden: int = 128, experts: int = 8, top_k: int = 2,
               heads: int = 4, kv_heads: int = 2, head_dim: int = 32, moe_intermediate: int | None = None,
               intermediate: int | None = None, vocab_size: int = 2048, max_position: int = 4096, seed: int = 0,
               dtype: str = "float32", max_shard_bytes: int | None = None) -> Path:
    """Write a random-weight checkpoint to outdir and return its path."""
    from safetensors.torch import save_file

    from epplat.core.model.tokenizer_gen import save_tokenizer
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(_DTYPES)}")
    if top_k > experts or heads % kv_heads:
        raise ValueError("need top_k <= experts and heads divisible by kv_heads")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    ids = save_tokenizer(out, vocab_size, max_position)
    cfg = _config(arch, layers, hidden, experts, top_k, heads, kv_heads, head_dim, moe_intermediate or hidden,
                  intermediate or 4 * hidden, vocab_size, max_position, dtype, ids)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
         "pad_token_id": ids["<|endoftext|>"]}, indent=2))
    specs = tensor_specs(arch, cfg)
    elt = 4 if dtype == "float32" else 2
    shards, cur, size = [], [], 0
    for spec in specs:
        n = math.prod(spec[1]) * elt
        if cur and max_shard_bytes and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(spec)
        size += n
    shards.append(cur)
    if len(shards) == 1:
        save_file({n: _tensor(n, s, i, seed, dtype) for n, s, i in shards[0]}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        return out
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: _tensor(n, s, i, seed, dtype) for n, s, i in shard}, str(out / fname),
                  metadata={"format": "pt"})
        weight_map.update({n: fname for n, _, _ in shard})
    total = sum(math.prod(s) * elt for _, s, _ in specs)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def _size(s: str) -> int:
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    low = s.strip().lower()
    for u, m in units.items():
        if low.endswith(u) and low[: -len(u)].strip().replace(".", "", 1).isdigit():
            return int(float(low[: -len(u)]) * m)
    if low.isdigit():
        return int(low)
    raise argparse.ArgumentTypeError(f"{s!r} is not a size like 500MB or 2GB")


def _pos(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be positive")
    return v


def add_cli(sub) -> None:
    p = sub.add_parser("make-model", help="write a random-weight MoE checkpoint (Hugging Face layout)")
    p.add_argument("arch", choices=ARCHS)
    p.add_argument("outdir")
    for flag, default in (("--layers", 2), ("--hidden", 128), ("--experts", 8), ("--top-k", 2), ("--heads", 4),
                          ("--kv-heads", 2), ("--head-dim", 32), ("--moe-intermediate", None),
                          ("--intermediate", None), ("--vocab-size", 2048), ("--max-position", 4096)):
        p.add_argument(flag, type=_pos, default=default)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=_DTYPES, default="float32")
    p.add_argument("--max-shard-size", type=_size, default=None, help="e.g. 500MB; default: one file")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import sys
    try:
        path = make_model(args.arch, args.outdir, layers=args.layers, hidden=args.hidden, experts=args.experts,
                          top_k=args.top_k, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                          moe_intermediate=args.moe_intermediate, intermediate=args.intermediate,
                          vocab_size=args.vocab_size, max_position=args.max_position, seed=args.seed,
                          dtype=args.dtype, max_shard_bytes=args.max_shard_size)
    except ValueError as e:
        print(f"epplat make-model: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
