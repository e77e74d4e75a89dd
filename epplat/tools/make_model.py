"""``epplat make-model``: random-weight MoE checkpoints in the Hugging Face hub layout.

Writes config.json, generation_config.json, tokenizer files and safetensors shards with
the per-expert tensor names real checkpoints use on disk, so transformers, vLLM and
epplat all load them. Every tensor comes from its own generator, seeded from ``seed``
and the tensor's name, so the weights do not depend on sharding; tensors are made on a
few threads and streamed into the files one at a time, so even a model of hundreds of
GB never sits in memory.

Default init (``std=None``): embeddings N(0, 1), every other matrix N(0, 1/fan_in),
norm weights 1 + N(0, 0.1^2). Activations and logits stay O(1) at any width, so greedy
output is varied and depends on attention and the experts (a flat std of 0.02 makes
small models repeat one token). The norm jitter makes a dropped norm weight visible.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import struct
import sys
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from epplat.tools import make_deepseek

ARCHS = ("qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3")
DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
FP8_BLOCK = 128        # DeepSeek-V3's weight_block_size; tiny shapes get blocks cut short at the edges


def _stored(spec, dtype: str) -> tuple[str, int]:
    """(safetensors dtype code, bytes per element) of one spec: fp8 weights and their scales keep theirs."""
    return {"fp8": ("F8_E4M3", 1), "fp8_scale": ("F32", 4)}.get(spec[2], DTYPES[dtype])


def _fp8_specs(specs: list) -> list:
    """DeepSeek-V3's fp8 layout: each linear it quantizes becomes an fp8 weight plus its weight_scale_inv."""
    from epplat.core.model.fp8_blocks import DEEPSEEK_FP8
    out = []
    for name, shape, kind in specs:
        if not DEEPSEEK_FP8.search(name):
            out.append((name, shape, kind))
            continue
        out += [(name, shape, "fp8"),
                (name + "_scale_inv", tuple(-(-d // FP8_BLOCK) for d in shape), "fp8_scale")]
    return out


def _fp8_tensor(spec, plain, shapes: dict):
    """An fp8 spec's tensor: the random weight ``plain`` makes for its weight's name, quantized in blocks
    (``shapes``: the fp8 weights' shapes by name)."""
    from epplat.core.model.fp8_blocks import quantize_blocks
    weight = spec[0].removesuffix("_scale_inv")
    q, s = quantize_blocks(plain((weight, shapes[weight], "linear")), FP8_BLOCK)
    return q if spec[2] == "fp8" else s


def _config(arch, *, layers, hidden, experts, top_k, heads, kv_heads, head_dim, moe_inter, inter, vocab,
            max_position, dtype, ids) -> dict:
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=head_dim, hidden_act="silu",
                  max_position_embeddings=max_position, rope_theta=1000000.0, rope_scaling=None,
                  attention_dropout=0.0, initializer_range=0.02, num_experts_per_tok=top_k,
                  output_router_logits=False, router_aux_loss_coef=0.001, sliding_window=None,
                  tie_word_embeddings=False, use_cache=True, bos_token_id=ids["<|endoftext|>"],
                  eos_token_id=ids["<|im_end|>"], torch_dtype=dtype, dtype=dtype)
    if arch == "qwen3_moe":
        return dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=experts,
                    moe_intermediate_size=moe_inter, intermediate_size=inter, decoder_sparse_step=1,
                    mlp_only_layers=[], norm_topk_prob=True, rms_norm_eps=1e-6, attention_bias=False,
                    use_sliding_window=False, max_window_layers=layers, **common)
    return dict(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=experts,
                intermediate_size=moe_inter, rms_norm_eps=1e-5, **common)


def tensor_specs(arch: str, c: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every checkpoint tensor, in file order; kind is 'norm', 'embed', 'linear' or 'bias'."""
    if arch.startswith("deepseek"):
        return make_deepseek.tensor_specs(c)
    h, d, v = c["hidden_size"], c["head_dim"], c["vocab_size"]
    qh, kvh = c["num_attention_heads"], c["num_key_value_heads"]
    if arch == "qwen3_moe":
        moe, inter, experts, projs = "mlp", c["moe_intermediate_size"], c["num_experts"], ("gate_proj", "up_proj", "down_proj")
    else:
        moe, inter, experts, projs = "block_sparse_moe", c["intermediate_size"], c["num_local_experts"], ("w1", "w3", "w2")
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
            q = f"{p}{moe}.experts.{e}."
            specs += [(q + projs[0] + ".weight", (inter, h), "linear"), (q + projs[1] + ".weight", (inter, h), "linear"),
                      (q + projs[2] + ".weight", (h, inter), "linear")]
    specs += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (v, h), "linear")]
    return specs


def make_tensor(name: str, shape, kind: str, seed: int, dtype: str, std: float | None = None,
                norm_std: float = 0.1):
    """One tensor, a function of (seed, name) only."""
    import torch
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF)
    t = torch.randn(shape, generator=g)
    if kind == "norm":
        t = t.mul_(norm_std).add_(1.0)
    elif kind == "bias":
        t = t.mul_(0.1)
    elif std is not None:
        t = t.mul_(std)
    elif kind == "linear":
        t = t.div_(math.sqrt(shape[1]))
    return t.to(getattr(torch, dtype)).contiguous()


_ROUTER = re.compile(r"\.(mlp|block_sparse_moe)\.gate\.weight$")


def skew_router(gate, alpha: float):
    """Router weight [E, H] with row e scaled by (e+1)^-alpha / mean (low experts get more tokens)."""
    import torch
    scale = torch.arange(1, gate.shape[0] + 1, dtype=torch.float64) ** -alpha
    return (gate.double() * (scale / scale.mean())[:, None]).to(gate.dtype).contiguous()


def write_safetensors(path, specs, dtype: str, tensor_fn, workers: int = 1) -> None:
    """Write a .safetensors file tensor by tensor; ``tensor_fn(spec)`` makes each (on ``workers`` threads)."""
    import torch
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for spec in specs:
        name, shape, _ = spec
        code, elt = _stored(spec, dtype)
        n = math.prod(shape) * elt
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = Path(f"{path}.partial")
    with open(tmp, "wb") as f, ThreadPoolExecutor(max(1, workers)) as pool:
        f.write(struct.pack("<Q", len(raw)) + raw)
        pending = deque()
        for spec in [*specs, None]:
            if spec is not None:
                pending.append(pool.submit(tensor_fn, spec))
            while pending and (spec is None or len(pending) > 2 * workers):
                f.write(pending.popleft().result().view(torch.uint8).numpy())
    os.replace(tmp, path)


def make_model(arch: str, outdir, *, layers: int = 2, hidden: int = 128, experts: int = 8, top_k: int = 2,
               heads: int = 4, kv_heads: int = 2, head_dim: int = 32, moe_intermediate: int | None = None,
               intermediate: int | None = None, vocab_size: int = 2048, max_position: int = 4096, seed: int = 0,
               dtype: str = "float32", max_shard_bytes: int | None = None, std: float | None = None,
               norm_std: float = 0.1, workers: int | None = None, router_skew: float = 0.0, fp8: bool = False,
               **deepseek) -> Path:
    """Write a random-weight checkpoint to ``outdir`` (created if missing) and return its path.

    ``moe_intermediate`` defaults to ``hidden``; ``intermediate`` (the dense MLP size, which
    qwen3_moe's config carries) to ``4 * hidden``. ``std=None`` picks the fan-in scaled init
    described in the module docstring; a number gives every matrix N(0, std^2). Weights are
    one file unless ``max_shard_bytes`` is set and exceeded. ``router_skew`` a > 0 scales
    router row e by (e+1)^-a (normalised to mean 1): low-numbered experts then win top-k
    more often, a skewed expert load for load-balancing tests. DeepSeek architectures take
    the keyword options of ``make_deepseek.OPTIONS`` (head_dim is their qk_nope / v head dim).
    ``fp8`` (DeepSeek only) writes DeepSeek-V3's fp8 layout (epplat.core.model.fp8_blocks): the linears it
    quantizes as float8_e4m3fn with a float32 ``weight_scale_inv`` per 128x128 block, the rest in ``dtype``.
    """
    from epplat.tools.tokenizer_gen import save_tokenizer
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if top_k > experts or heads % kv_heads:
        raise ValueError("need top_k <= experts and heads divisible by kv_heads")
    dims = dict(layers=layers, hidden=hidden, experts=experts, top_k=top_k, heads=heads, kv_heads=kv_heads,
                head_dim=head_dim, vocab_size=vocab_size, max_position=max_position)
    if bad := [k for k, v in dims.items() if not isinstance(v, int) or v <= 0]:
        raise ValueError(f"{', '.join(bad)} must be positive integers")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    ids = save_tokenizer(out, vocab_size, max_position)
    if bad := set(deepseek) - set(make_deepseek.OPTIONS if arch.startswith("deepseek") else ()):
        raise ValueError(f"{arch} takes no option {', '.join(sorted(bad))}")
    if fp8 and not arch.startswith("deepseek"):
        raise ValueError("--fp8 writes DeepSeek-V3's fp8 layout: deepseek_v2 / deepseek_v3 only")
    make_cfg = (functools.partial(make_deepseek.config, opts=deepseek) if arch.startswith("deepseek")
                else _config)
    cfg = make_cfg(arch, layers=layers, hidden=hidden, experts=experts, top_k=top_k, heads=heads, kv_heads=kv_heads,
                  head_dim=head_dim, moe_inter=moe_intermediate or hidden, inter=intermediate or 4 * hidden,
                  vocab=vocab_size, max_position=max_position, dtype=dtype, ids=ids)
    if fp8:
        from epplat.core.model.fp8_blocks import config_for
        cfg["quantization_config"] = config_for(FP8_BLOCK)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
         "pad_token_id": ids["<|endoftext|>"], "do_sample": False}, indent=2))

    specs = tensor_specs(arch, cfg)
    specs = _fp8_specs(specs) if fp8 else specs
    shards, size = [[]], 0
    for spec in specs:
        n = math.prod(spec[1]) * _stored(spec, dtype)[1]
        if shards[-1] and max_shard_bytes and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    workers = workers or min(8, os.cpu_count() or 1)
    fn = lambda s: make_tensor(s[0], s[1], s[2], seed, dtype, std, norm_std)  # noqa: E731
    if router_skew:
        plain = fn
        fn = lambda s: skew_router(plain(s), router_skew) if _ROUTER.search(s[0]) else plain(s)  # noqa: E731
    if fp8:
        base = lambda s: make_tensor(s[0], s[1], s[2], seed, "float32", std, norm_std)  # noqa: E731
        unquantized = fn
        shapes = {s[0]: s[1] for s in specs if s[2] == "fp8"}
        fn = lambda s: _fp8_tensor(s, base, shapes) if s[2].startswith("fp8") else unquantized(s)  # noqa: E731
    for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)   # a re-run with other sharding must not leave stale files
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", specs, dtype, fn, workers)
        return out
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / fname, shard, dtype, fn, workers)
        weight_map.update({name: fname for name, _, _ in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(math.prod(s[1]) * _stored(s, dtype)[1] for s in specs)},
         "weight_map": weight_map},
        indent=2))
    return out


def parse_size(s: str) -> int:
    """'500MB', '2GB', '1.5GiB', '123' -> bytes."""
    low = s.strip().lower().removesuffix("b")
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    num, mult = low, 1
    for u in sorted(units, key=len, reverse=True):
        if low.endswith(u):
            num, mult = low[: -len(u)].strip(), units[u]
            break
    try:
        v = int(float(num) * mult)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a size like 500MB or 2GB")
    return v


def _int_at_least(lo: int):
    """An argparse type: an integer >= lo (1: "positive", 0: "not negative")."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{s!r} must be a positive integer" if lo == 1 else
                                             f"{s!r} must not be negative")
        return v
    parse.__name__ = "integer"
    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"{s!r} must be a positive number")
    return v


def add_cli(subparsers) -> None:
    """Register ``epplat make-model ARCH OUTDIR [options]``."""
    p = subparsers.add_parser("make-model", help="write a random-weight MoE checkpoint (Hugging Face layout)",
                              description="Write a random-weight MoE checkpoint in the Hugging Face hub layout.")
    p.add_argument("arch", choices=ARCHS)
    p.add_argument("outdir")
    for flag, default in (("--layers", 2), ("--hidden", 128), ("--experts", 8), ("--top-k", 2), ("--heads", 4),
                          ("--kv-heads", 2), ("--head-dim", 32), ("--moe-intermediate", None),
                          ("--intermediate", None), ("--vocab-size", 2048), ("--max-position", 4096)):
        p.add_argument(flag, type=_positive, default=default, metavar="N")
    ds = p.add_argument_group("deepseek_v2 / deepseek_v3 (--head-dim is the qk_nope and v head dim)")
    for opt in make_deepseek.OPTIONS:
        ds.add_argument("--" + opt.replace("_", "-"), type=_non_negative, default=None, metavar="N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--std", type=_positive_float, default=None,
                   help="N(0, std^2) for every matrix (default: embeddings N(0,1), others N(0,1/fan_in))")
    p.add_argument("--router-skew", type=_positive_float, default=0.0, metavar="A",
                   help="scale router row e by (e+1)^-A: a skewed expert load (for load-balancing tests)")
    p.add_argument("--fp8", action="store_true",
                   help="deepseek: DeepSeek-V3's fp8 layout (float8_e4m3fn linears, a weight_scale_inv per "
                        "128x128 block, quantization_config in config.json)")
    p.add_argument("--max-shard-size", type=parse_size, default=None, metavar="SIZE",
                   help="split the weights into shards of at most SIZE, e.g. 5GB (default: one file)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    try:
        path = make_model(args.arch, args.outdir, layers=args.layers, hidden=args.hidden, experts=args.experts,
                          top_k=args.top_k, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                          moe_intermediate=args.moe_intermediate, intermediate=args.intermediate,
                          vocab_size=args.vocab_size, max_position=args.max_position, seed=args.seed,
                          dtype=args.dtype, max_shard_bytes=args.max_shard_size, std=args.std,
                          router_skew=args.router_skew, fp8=args.fp8,
                          **{o: getattr(args, o) for o in make_deepseek.OPTIONS if getattr(args, o) is not None})
    except (ValueError, OSError) as e:
        print(f"epplat make-model: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
