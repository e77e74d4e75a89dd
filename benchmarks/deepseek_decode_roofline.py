"""DeepSeek decode step on one GPU against the HBM roofline (MLA over the latent cache, CUDA graphs).

Builds a random-weight model shaped like DeepSeek-V2-Lite (27 layers, hidden 2048, 16 heads,
no q LoRA, kv_lora_rank 512, rope dim 64, 64 routed experts top-6, 2 shared experts, expert
width 1408, first layer dense, vocab 102400; the config values of the public checkpoint, as
in deepseek_kv_bytes.py) directly on the GPU with the cuda platform's kernels, fills the paged
latent cache so every sequence has CONTEXT tokens, and times one decode step (forward + logits)
per batch size, eager and with CUDA graphs. The roofline is the bytes a step must read (every
weight but the routed experts and the embedding table; the routed experts the batch hits,
expected count under uniform routing; the batch's embedding rows; the latent cache: 576
values per token and layer) over the device-to-device copy bandwidth of the same run.
``--fp8`` serves it as ``--quantization fp8`` serves DeepSeek-V3's fp8 checkpoint: every linear of
the attention and the MLPs and every expert in float8_e4m3 with 128x128 block scales (kv_b_proj's
bf16 copy for the absorbed decode too); the roofline counts those bytes.

    python benchmarks/deepseek_decode_roofline.py --batch 1 64 256 --context 512 [--fp8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from decode_roofline import copy_bandwidth, step_times  # noqa: E402
from deepseek_kv_bytes import SHAPES  # noqa: E402

from epplat.core.model import deepseek  # noqa: E402
from epplat.core.moe.all2all import ExpertMap  # noqa: E402
from epplat.core.moe.all2all_torch import AllGatherReduceScatter  # noqa: E402
from epplat.platforms.cuda.graphs import CudaGraphRunner  # noqa: E402
from epplat.platforms.cuda.platform import CudaPlatform  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="DeepSeek-V2-Lite", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the checkpoint's (default: all)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--profile", type=int, nargs="*", default=[])
    p.add_argument("--fp8", action="store_true", help="linears and experts in fp8, 128x128 block scales")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    hf = dict(SHAPES[a.shape], max_position_embeddings=a.context + 64)
    if a.layers:
        hf["num_hidden_layers"] = a.layers
    cfg = deepseek.parse_config(hf)
    dev, dtype, elt = torch.device("cuda", 0), torch.bfloat16, 2
    with torch.device(dev):
        model = deepseek.DeepseekForCausalLM(cfg, AllGatherReduceScatter(ExpertMap(cfg.num_experts), device=dev),
                                             dtype, kernels=CudaPlatform().kernels)
    g = torch.Generator(device=dev).manual_seed(0)
    for prm in model.parameters():
        prm.data.normal_(0, 0.02, generator=g) if prm.dim() > 1 else prm.data.fill_(1.0)
    if a.fp8:
        to_fp8(model)
    blocks_per_seq = -(-(a.context + 1) // a.block_size)
    nblocks = max(a.batch) * blocks_per_seq
    for attn in model.kv_layers():
        attn.kv_cache = tuple(torch.randn(s, device=dev, dtype=dtype) * 0.1
                              for s in attn.kv_cache_shapes(nblocks + 2, a.block_size))
    # step_times reads these names off the args (the vocabulary of the random token ids)
    a.vocab = cfg.vocab_size
    bw = copy_bandwidth(dev)
    routed = [n for n, _ in model.named_parameters() if ".mlp.w13" in n or ".mlp.w2" in n]
    # a decode step reads kv_b_proj's absorbed bf16 copy where fp8 keeps one, not the fp8 weight (prefill's)
    absorbed = [attn.w_kv_b for attn in model.kv_layers() if attn.w_kv_b is not None]
    dense = sum(prm.numel() * prm.element_size() for n, prm in model.named_parameters()
                if n not in routed and n != "embed_tokens" and not (absorbed and "kv_b_proj" in n))
    dense += sum(w.numel() * w.element_size() for w in absorbed)
    moe_layers = cfg.num_layers - len(cfg.dense_layers)
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * ((1 + 4 / 128 ** 2) if a.fp8 else elt)
    runner = CudaGraphRunner(model, dev)
    runner.capture(a.batch, blocks_per_seq, nblocks, (nblocks + 1) * a.block_size)
    times = step_times(model, runner, a, dev, nblocks, blocks_per_seq, a.profile)
    rows = []
    for b in a.batch:
        eager, graph = times[b]
        hit = cfg.num_experts * (1 - (1 - cfg.top_k / cfg.num_experts) ** b)
        kv = b * (a.context + 1) * cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elt
        need = dense + b * cfg.hidden_size * elt + moe_layers * hit * per_expert + kv
        roof = need / bw
        rows.append({"batch": b, "eager_ms": eager * 1e3, "graph_ms": graph * 1e3, "roofline_ms": roof * 1e3,
                     "bytes": need, "kv_bytes": kv, "graph_frac_of_roofline": roof / graph})
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s (read+write); {a.shape} shape, "
          f"{cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.top_k} + {cfg.n_shared_experts} shared, "
          f"MLA latent {cfg.kv_lora_rank}+{cfg.qk_rope_head_dim}, context {a.context}, "
          + ("fp8 linears and experts (128x128 blocks), bf16 activations and KV cache" if a.fp8 else "bf16"))
    print(f"{'batch':>6}{'GB read':>9}{'of it KV':>9}{'roofline':>10}{'eager':>10}{'graphs':>10}{'graphs/roof':>13}")
    for r in rows:
        print(f"{r['batch']:>6}{r['bytes'] / 1e9:>9.2f}{r['kv_bytes'] / 1e9:>9.2f}{r['roofline_ms']:>8.2f}ms"
              f"{r['eager_ms']:>8.2f}ms{r['graph_ms']:>8.2f}ms{r['graph_frac_of_roofline'] * 100:>12.0f}%")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "copy_bw": bw, "rows": rows}, f, indent=2)


def to_fp8(model) -> None:
    """Every linear of the attention and the MLPs and every expert in fp8 with 128x128 block scales, as
    --quantization fp8 loads DeepSeek-V3's fp8 checkpoint (kv_b_proj's bf16 copy kept for the absorbed decode)."""
    from epplat.core.model.decoder import Projections
    from epplat.core.model.fp8_blocks import quantize_blocks
    from epplat.core.model.mla import MLAttention
    from epplat.core.moe.layer import FusedMoE
    from epplat.platforms.cuda.fp8 import Fp8BlockQuant, make_fp8_linear
    from epplat.platforms.cuda.fp8_moe import quantize
    for module in list(model.modules()):
        if isinstance(module, Projections):
            for name, prm in list(module.named_parameters(recurse=False)):
                if prm.dim() == 2:
                    if isinstance(module, MLAttention) and name == "kv_b_proj":
                        module.w_kv_b = prm.data
                    make_fp8_linear(module, name, *quantize_blocks(prm.data))
        elif isinstance(module, FusedMoE):
            (q13, s13), (q2, s2) = quantize(module.w13.data), quantize(module.w2.data)
            Fp8BlockQuant._swap(module, q13, q2, s13, s2)
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
