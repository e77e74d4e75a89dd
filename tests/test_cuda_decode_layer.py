"""The cuda platform's fused decode layer (epplat.platforms.cuda.decode_layer: q/k norm + rotary + KV write
in one launch, the attention merge inside the split kernel, the
residual inside the experts' sum) and its fused prefill layer (prefill_layer) run by Triton's CPU interpreter (TRITON_INTERPRET=1) against the same layer
run module by module in torch, and the masked expert kernels it calls on fp8 weights against float64; on a GPU,
tests/test_gpu.py checks it against the modules' Triton kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_INTERPRETED = r'''
import os
import torch
from epplat.core.distributed.parallel_state import ParallelState
from epplat.core.model.attention import build_attn_metadata
from epplat.core.model.decoder import DecoderConfig, DecoderLayer
from epplat.core.model.layers import RotaryEmbedding
from epplat.core.moe.all2all import ExpertMap
from epplat.core.moe.all2all_torch import AllGatherReduceScatter
from epplat.core.ops import TORCH
from epplat.platforms.cuda import decode_layer, pdl, triton_attention
from epplat.platforms.cuda.kernels import cuda_kernels

cuda = cuda_kernels()
dev = torch.device(os.environ.get("EPPLAT_TEST_DEVICE", "cpu"))    # test_gpu.py runs this on cuda
pdl.ENABLED = os.environ.get("EPPLAT_TEST_PDL") == "1"             # and with dependent launches
assert pdl.on(dev) == (pdl.ENABLED and dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9)
# 5 and 20 rows through cuBLAS-sized GEMMs; 2 rows through the Triton GEMV, with a sequence long enough to be
# split over several programs (the merge of their slices) beside one of a single token
for qk_norm, renorm, lens in ((True, True, [5, 16, 17, 40, 33]), (False, False, [1] + list(range(2, 40, 2))),
                              (True, False, [250, 1])):
    cfg = DecoderConfig(vocab_size=64, hidden_size=128, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32,
                        max_position=256, rope_theta=1e6, rms_norm_eps=1e-6, num_experts=8, top_k=3,
                        moe_intermediate_size=64, intermediate_size=0, qk_norm=qk_norm, norm_topk_prob=renorm)
    layer = DecoderLayer(cfg, 0, RotaryEmbedding(32, 256, 1e6, cuda), AllGatherReduceScatter(ExpertMap(8)),
                         ParallelState(), torch.float32, kernels=cuda).to(dev)
    g = torch.Generator().manual_seed(int(qk_norm))
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    per = max(lens) // 16 + 1
    shape = (len(lens) * per + 2, 16, 2, 32)
    caches = (torch.randn(shape, generator=g).to(dev), torch.randn(shape, generator=g).to(dev))
    # 20 rows: a sequence of one token and ones ending on a block edge
    seqs = [(n, 1, list(range(i * per, i * per + per))) for i, n in enumerate(lens)]
    meta = build_attn_metadata(seqs, 16, dev, pad_block=shape[0] - 1, kernels=cuda)
    x = torch.randn(len(lens), 128, generator=g).to(dev)
    pos = torch.tensor([n - 1 for n in lens], device=dev)
    layer.self_attn.kv_cache = tuple(c.clone() for c in caches)
    fused = decode_layer.decode_layer(layer, x, pos, meta)
    assert fused is not None
    assert int(sum(c.abs().sum() for c in triton_attention._counters.values())) == 0   # every counter reset
    fused_caches = layer.self_attn.kv_cache
    for m in layer.modules():                                                        # the torch modules
        if "kernels" in vars(m):
            m.kernels = TORCH
    layer.self_attn.kv_cache = tuple(c.clone() for c in caches)
    tmeta = build_attn_metadata(seqs, 16, dev, pad_block=shape[0] - 1)
    ref = layer(x, pos, tmeta)
    err = float((fused - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, err
    for a, b in zip(fused_caches, layer.self_attn.kv_cache):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fused_caches[0], caches[0])                            # the step's keys were written
    # what it does not take: a prefill chunk
    prefill = build_attn_metadata([(4, 4, [0])], 16, dev, pad_block=shape[0] - 1)
    for m in layer.modules():
        if "kernels" in vars(m):
            m.kernels = cuda
    assert decode_layer.decode_layer(layer, x[:1], torch.arange(1, device=dev), prefill) is None
    # the prefill layer, through the record's decoder_layer: a step of two decodes, a chunk over a cached prefix
    # and a fresh prompt, against the modules; the KV cache written alike
    seqs = [(9, 1, [0]), (20, 1, [2, 3]), (30, 12, [4, 5]), (17, 17, [6, 7])]
    meta = build_attn_metadata(seqs, 16, dev, pad_block=shape[0] - 1, kernels=cuda)
    x = torch.randn(31, 128, generator=g).to(dev)
    pos = torch.cat([torch.arange(n - q, n) for n, q, _ in seqs]).to(dev)
    layer.self_attn.kv_cache = tuple(c.clone() for c in caches)
    assert decode_layer.decode_layer(layer, x, pos, meta) is None
    fused = cuda.decoder_layer(layer, x, pos, meta)
    assert fused is not None                                      # prefill_layer took it (decode_layer did not)
    fused_caches = layer.self_attn.kv_cache
    for m in layer.modules():
        if "kernels" in vars(m):
            m.kernels = TORCH
    layer.self_attn.kv_cache = tuple(c.clone() for c in caches)
    ref = layer(x, pos, build_attn_metadata(seqs, 16, dev, pad_block=shape[0] - 1))
    err = float((fused - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, err
    for a, b in zip(fused_caches, layer.self_attn.kv_cache):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for m in layer.modules():
        if "kernels" in vars(m):
            m.kernels = cuda
# the merge of 6 slices 4 at a time (what bf16 takes) equal to one at a time
q, k, v = torch.randn(1, 4, 32, generator=g).to(dev), *torch.randn(2, 45, 16, 2, 32, generator=g).to(dev)
lens, tables = torch.tensor([700], dtype=torch.int32, device=dev), torch.arange(45, device=dev).int()[None]
assert torch.equal(*(triton_attention.decode_attention(q, k, v, tables, lens, 0.2, merge=s) for s in (1, 4)))
# the attention's two-launch form (no counter buffer: the merge in a second kernel), slices of a 64-token page
triton_attention._counters.clear()
triton_attention._COUNTERS = 0
k, v = torch.randn(2, 12, 64, 2, 32, generator=g).to(dev)
q = torch.randn(2, 4, 32, generator=g).to(dev)
lens = torch.tensor([350, 1], dtype=torch.int32, device=dev)
tables = torch.randperm(12, generator=g).view(2, 6).int().to(dev)
out = triton_attention.decode_attention(q, k, v, tables, lens, 32 ** -0.5)
for i in range(2):
    keys, vals = (c[tables[i].long()].reshape(-1, 2, 32)[: lens[i]].repeat_interleave(2, 1) for c in (k, v))
    att = torch.softmax(torch.einsum("hd,lhd->hl", q[i], keys) * 32 ** -0.5, -1)
    torch.testing.assert_close(out[i], torch.einsum("hl,lhd->hd", att, vals), rtol=1e-5, atol=1e-5)
# prefill attention over the paged cache in one launch (triton_prefill_attention) after a decode: chunks over
# cached prefixes (off a block edge; longer than a key tile, so tiles before the diagonal run unmasked), a fresh
# one, against SDPA per chunk over the gathered context; the default tiles and narrower query tiles
from epplat.core.model.attention import paged_attention
from epplat.platforms.cuda.triton_prefill_attention import prefill_attention
k, v = torch.randn(2, 30, 16, 2, 32, generator=g).to(dev)
seqs = [(9, 1, [0]), (100, 40, list(range(1, 8))), (33, 33, [8, 9, 10]), (70, 5, list(range(11, 16)))]
q = torch.randn(79, 4, 32, generator=g).to(dev)
kn, vn = torch.randn(2, 79, 2, 32, generator=g).to(dev)
ref = paged_attention(q, kn, vn, (k.clone(), v.clone()), build_attn_metadata(seqs, 16, dev, pad_block=29), 0.2)
kc, vc = k.clone(), v.clone()
meta = build_attn_metadata(seqs, 16, dev, pad_block=29, kernels=cuda)
assert meta.prefills[0]._mask is None                                      # no mask made for the kernel
torch.testing.assert_close(paged_attention(q, kn, vn, (kc, vc), meta, 0.2, cuda), ref, rtol=1e-5, atol=1e-5)
assert all(p._mask is None for p in meta.prefills)
out = torch.zeros_like(q)
assert prefill_attention(q, kc, vc, meta, 0.2, out, tiles=(16, 64, 4, 1))
torch.testing.assert_close(out[1:], ref[1:], rtol=1e-5, atol=1e-5)
# the masked expert kernels on fp8 weights (tiles times their blocks' scales, far from 1 here), float16 activations
# (the interpreter's bfloat16 dots are wrong), against float64 on the dequantized weights
from epplat.platforms.cuda.fp8_moe import dequantize, quantize
from epplat.platforms.cuda.triton_moe import triton_experts
g = torch.Generator().manual_seed(0)
x, ids = torch.randn(2, 128, generator=g).half().to(dev), torch.tensor([[0, 2], [2, 3]], device=dev)
w = torch.softmax(torch.randn(2, 2, generator=g), -1).half().to(dev)
(q13, s13), (q2, s2) = (quantize((torch.randn(4, *shape, generator=g) / shape[0] ** 0.5).to(dev))
                        for shape in ((128, 512), (256, 128)))
s13, s2 = s13 * torch.rand(s13.shape, generator=g).to(dev) * 8, s2 * torch.rand(s2.shape, generator=g).to(dev) * 8
out = triton_experts(x, ids, w, q13, q2, torch.nn.functional.silu, w13_scale=s13, w2_scale=s2).double()
w13, w2 = dequantize(q13, s13, torch.float32).double(), dequantize(q2, s2, torch.float32).double()
ref = torch.zeros(2, 128, dtype=torch.float64, device=dev)
for t in range(2):
    for j in range(2):
        gu = (x[t].double() @ w13[ids[t, j]]).float()
        ref[t] += w[t, j].double() * ((torch.nn.functional.silu(gu[:256]) * gu[256:]).half().double() @ w2[ids[t, j]])
err = float((out - ref).norm() / ref.norm())
assert err < 2e-3, err
print("ok")
'''


def test_fused_decode_layer_in_the_triton_interpreter_matches_the_torch_modules():
    """float32 (tensor-core dots in IEEE precision): three layers (with and without q/k norm and top-k
    renormalisation), 5, 20 and 2 decode rows (the last through the Triton GEMV, one sequence split over
    several programs), against the torch modules within 1e-5; the KV cache written alike; the kernels' atomic
    counters back at zero; a prefill chunk declined; the attention's two-launch form against softmax; the
    masked expert kernels on fp8 weights within 2e-3 of float64."""
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def _ptx_for_sm90(fn, signature: dict, constants: dict, aligned: tuple, **options) -> str:
    """fn compiled by Triton for an sm_90 target (no GPU needed: its own ptxas checks the PTX); the arguments
    numbered in ``aligned`` taken as 16-divisible, as Triton specialises them at a launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options).asm["ptx"]


def test_batch_one_decode_kernels_compile_for_hopper_with_wide_loads():
    """The GEMV (with a programmatic-dependent launch) and the attention's split kernel compiled for sm_90 on
    the CPU, at the Qwen3-30B-A3B layer's batch-1 tiles: the GEMV's weight loads 16 bytes wide and, launched
    as a dependent, its weights asked for in L2 before it waits; the attention's K/V tiles through cp.async."""
    pytest.importorskip("triton")
    from epplat.platforms.cuda import triton_attention, triton_gemv
    bn, bk = triton_gemv.tiles(5120, 2048, 132, 1)
    ints = ("M", "N", "K", "stride_xm", "stride_wn", "stride_ym")
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", **dict.fromkeys(ints, "i32"),
           **dict.fromkeys(("M_P", "BN", "BK", "PDL"), "constexpr")}
    ptx = _ptx_for_sm90(triton_gemv._gemv_kernel.jit, sig, {"M_P": 1, "BN": bn, "BK": bk, "PDL": True},
                        (0, 1, 2, 4, 5, 6, 7), num_warps=4, launch_pdl=True)
    assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
    assert ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait")     # W asked for before the wait
    assert ptx.count("ld.global.v4") >= 4 and "ld.global.b16" not in ptx, ptx.count("ld.global")
    sig = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr")}
    sig.update({"tables_ptr": "*i32", "lens_ptr": "*i32", "o_ptr": "*fp32", "lse_ptr": "*fp32", "scale": "fp32",
                "table_stride": "i32", "q_stride": "i32"})
    sig.update(dict.fromkeys(("kv_heads", "group", "splits", "GROUP_P", "BLOCK", "D", "IEEE"), "constexpr"))
    sig.update({"out_ptr": "*bf16", "cnt_ptr": "*i32"})
    sig.update(dict.fromkeys(("FUSE_MERGE", "TILE", "MIN_TILES", "PDL", "MERGE"), "constexpr"))
    ptx = _ptx_for_sm90(triton_attention._decode_split_kernel.jit, sig, {
        "kv_heads": 4, "group": 8, "splits": 32, "GROUP_P": 16, "BLOCK": 16, "D": 128, "IEEE": False,
        "FUSE_MERGE": True, "TILE": 64, "MIN_TILES": 2, "PDL": False, "MERGE": triton_attention.MERGE_STEP},
        (0, 1, 2, 3, 4, 5, 6, 9, 17, 18), num_warps=4)
    assert "cp.async" in ptx and "atom.global" in ptx
