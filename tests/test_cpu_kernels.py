"""The cpu platform's C kernels (built with the system compiler) against the torch code they
stand in for: MoE experts, x @ w^T for a few rows, paged decode attention, norms, rope,
routing, KV writes, and the one-call decode layer against the same layer's modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from epplat.core.moe.experts import reference_experts
from epplat.core.ops import TORCH
from epplat.platforms.cpu import cpu_kernels
from epplat.platforms.cpu.platform import CpuPlatform


@pytest.fixture(scope="module", autouse=True)
def lib():
    assert cpu_kernels.load() is not None, "the CPU kernels did not build (see the warning in the log)"
    cpu_kernels.THREADS = 2


@pytest.mark.parametrize("rows,experts,k,hidden,inter", [(1, 8, 2, 64, 32), (5, 16, 4, 256, 128), (9, 8, 2, 128, 16),
                                                          (300, 8, 2, 64, 64),
                                                          (16, 16, 4, 256, 256), (3, 4, 3, 32, 16)])
def test_moe_experts_match_torch(rows, experts, k, hidden, inter):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, hidden, generator=g)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(rows)])
    ids[0, -1] = -1                       # an expert on another EP rank
    if rows > 2:
        ids[2] = -1                       # a row with no local expert at all
    w = torch.rand(rows, k, generator=g)
    w13 = torch.randn(experts, hidden, 2 * inter, generator=g) * 0.1
    w2 = torch.randn(experts, inter, hidden, generator=g) * 0.1
    got = cpu_kernels.moe_experts(x, ids, w, w13, w2, F.silu)
    torch.testing.assert_close(got, reference_experts(x, ids, w, w13, w2, F.silu), rtol=1e-5, atol=1e-5)
    if rows > 2:
        assert torch.count_nonzero(got[2]) == 0


def test_moe_experts_give_a_row_the_same_bits_in_a_prefill_and_a_decode_batch():
    """Experts with many rows go through the tiled GEMM, with few through the streaming one;
    both add the terms in the same order, so a token's output does not depend on its batch."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(400, 128, generator=g)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(400)])
    w = torch.rand(400, 2, generator=g)
    w13, w2 = torch.randn(4, 128, 64, generator=g) * 0.1, torch.randn(4, 32, 128, generator=g) * 0.1
    many = cpu_kernels.moe_experts(x, ids, w, w13, w2, F.silu)
    few = cpu_kernels.moe_experts(x[:3], ids[:3], w[:3], w13, w2, F.silu)
    assert torch.equal(many[:3], few)


def test_moe_experts_decline_what_they_do_not_take():
    x, ids, w = torch.randn(4, 64), torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2)
    w13, w2 = torch.randn(2, 64, 64), torch.randn(2, 32, 64)
    assert cpu_kernels.moe_experts(x, ids, w, w13, w2, F.gelu) is None            # not SiLU
    assert cpu_kernels.moe_experts(x.bfloat16(), ids, w, w13.bfloat16(), w2.bfloat16(), F.silu) is None


@pytest.mark.parametrize("rows", [1, 3, 4, 17, 32])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_torch(rows, bias):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 96, generator=g), torch.randn(40, 96, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    torch.testing.assert_close(cpu_kernels.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert cpu_kernels.linear(torch.randn(33, 96), w) is None


def test_decode_attention_matches_gather_and_softmax():
    g = torch.Generator().manual_seed(0)
    b, h, kvh, d, bs, nblk = 5, 8, 2, 64, 16, 64
    k = torch.randn(nblk, bs, kvh, d, generator=g)
    v = torch.randn(nblk, bs, kvh, d, generator=g)
    q = torch.randn(b, h, d, generator=g)
    lens = torch.tensor([1, 17, 32, 100, 160])
    tables = torch.randperm(nblk, generator=g)[: b * 10].view(b, 10)
    out = cpu_kernels.decode_attention(q, k, v, tables, lens, d ** -0.5)
    for i in range(b):
        keys = k[tables[i]].reshape(-1, kvh, d)[: lens[i]].repeat_interleave(h // kvh, 1)
        vals = v[tables[i]].reshape(-1, kvh, d)[: lens[i]].repeat_interleave(h // kvh, 1)
        att = torch.softmax(torch.einsum("hd,lhd->hl", q[i], keys) * d ** -0.5, -1)
        torch.testing.assert_close(out[i], torch.einsum("hl,lhd->hd", att, vals), rtol=1e-5, atol=1e-5)


def test_the_cpu_platform_hands_them_in_its_record():
    from epplat.platforms.cpu.fused_layer import decode_layer
    k = CpuPlatform().kernels
    assert k.decode_attention is cpu_kernels.decode_attention and k.kv_write is cpu_kernels.write_kv
    assert k.linear is cpu_kernels.linear and k.experts is cpu_kernels.moe_experts
    assert k.rms_norm is cpu_kernels.rms_norm and k.rope is cpu_kernels.rope
    assert k.route is cpu_kernels.route_topk and k.decoder_layer is decode_layer


def test_rms_norm_and_rope_match_torch_on_strided_views():
    from epplat.core.model.layers import RMSNorm, RotaryEmbedding
    g = torch.Generator().manual_seed(0)
    t, h, kvh, d = 7, 4, 2, 64
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=g)
    q, k, _ = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q, k = q.view(t, h, d), k.view(t, kvh, d)                 # strided views, as the model has them
    norm, rope = RMSNorm(d, 1e-6), RotaryEmbedding(d, 512, 1e6)     # torch's code (no kernels record)
    norm.weight.data.uniform_(0.5, 1.5, generator=g)
    pos = torch.tensor([0, 1, 2, 100, 200, 300, 511])
    ref_n, ref_r = norm(q), rope(pos, q, k)
    torch.testing.assert_close(cpu_kernels.rms_norm(q, norm.weight, 1e-6), ref_n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_kernels.rms_norm(qkv, torch.ones(qkv.shape[1]), 1e-6),
                               qkv * torch.rsqrt(qkv.pow(2).mean(-1, keepdim=True) + 1e-6), rtol=1e-5, atol=1e-5)
    got = cpu_kernels.rope(pos, q, k, rope.cos, rope.sin)
    torch.testing.assert_close(got[0], ref_r[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref_r[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("renormalize", [False, True])
def test_route_topk_matches_softmax_topk(renormalize):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(33, 16, generator=g) * 3
    weights, ids = cpu_kernels.route_topk(logits, 4, renormalize, torch.float32)
    probs = torch.softmax(logits, dim=-1)
    ref_w, ref_ids = torch.topk(probs, 4, dim=-1)
    if renormalize:
        ref_w = ref_w / ref_w.sum(dim=-1, keepdim=True)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)


def test_write_kv_fills_the_slots():
    g = torch.Generator().manual_seed(2)
    kc, vc = torch.zeros(8, 4, 2, 16), torch.zeros(8, 4, 2, 16)
    k, v = torch.randn(5, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    slots = torch.tensor([3, 0, 31, 17, 9])
    assert cpu_kernels.write_kv(k, v, kc, vc, slots)
    torch.testing.assert_close(kc.view(-1, 2, 16)[slots], k, rtol=0, atol=0)
    torch.testing.assert_close(vc.view(-1, 2, 16)[slots], v, rtol=0, atol=0)
    assert torch.count_nonzero(kc.view(-1, 2, 16)[[1, 2, 4]]) == 0
    assert not cpu_kernels.write_kv(k.bfloat16(), v.bfloat16(), kc.bfloat16(), vc.bfloat16(), slots)


def _decoder_layer(qk_norm: bool, all2all=None, kernels=None):
    from epplat.core.model.decoder import DecoderConfig, DecoderLayer
    from epplat.core.model.layers import RotaryEmbedding
    from epplat.core.moe.all2all import ExpertMap
    from epplat.core.moe.all2all_torch import AllGatherReduceScatter
    from epplat.core.distributed.parallel_state import ParallelState
    cfg = DecoderConfig(vocab_size=64, hidden_size=128, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32,
                        max_position=256, rope_theta=1e6, rms_norm_eps=1e-6, num_experts=8, top_k=3,
                        moe_intermediate_size=64, intermediate_size=0, qk_norm=qk_norm)
    a2a = all2all or AllGatherReduceScatter(ExpertMap(8))
    layer = DecoderLayer(cfg, 0, RotaryEmbedding(32, 256, 1e6, kernels or TORCH), a2a, ParallelState(), torch.float32, kernels=kernels or TORCH)
    g = torch.Generator().manual_seed(int(qk_norm))
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    blocks = 40
    shape = (blocks + 2, 16, 2, 32)
    layer.self_attn.kv_cache = (torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    return layer


@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_decode_layer_gives_the_modules_bits(qk_norm):
    """The cpu platform's one-call decode layer against the same layer run module by module."""
    import dataclasses

    from epplat.core.model.attention import build_attn_metadata
    from epplat.platforms.cpu import fused_layer
    modules = dataclasses.replace(CpuPlatform().kernels, decoder_layer=None)   # the C kernels one module at a time
    layer = _decoder_layer(qk_norm, kernels=modules)
    g = torch.Generator().manual_seed(3)
    lens = [5, 16, 17, 40, 33]
    seqs = [(n, 1, list(range(i * 8, i * 8 + 8))) for i, n in enumerate(lens)]
    meta = build_attn_metadata(seqs, 16, torch.device("cpu"), pad_block=40, kernels=modules)
    x = torch.randn(len(lens), 128, generator=g)
    pos = torch.tensor([n - 1 for n in lens])
    caches = [t.clone() for t in layer.self_attn.kv_cache]
    fused = fused_layer.decode_layer(layer, x, pos, meta)
    assert fused is not None
    fused_caches = layer.self_attn.kv_cache
    layer.self_attn.kv_cache = tuple(caches)
    ref = layer(x, pos, meta)
    assert torch.equal(fused, ref)
    assert all(torch.equal(a, b) for a, b in zip(fused_caches, layer.self_attn.kv_cache))
    # what it does not take: a prefill chunk, and an all2all backend that is not torch's own
    prefill = build_attn_metadata([(4, 4, [0])], 16, torch.device("cpu"), pad_block=40)
    assert fused_layer.decode_layer(layer, x[:4], torch.arange(4), prefill) is None

    from epplat.core.moe.all2all import All2AllBackend, ExpertMap
    assert fused_layer.decode_layer(_decoder_layer(qk_norm, All2AllBackend(ExpertMap(8)), modules), x, pos, meta) is None


def test_attention_metadata_is_one_buffer_with_aligned_views():
    """build_attn_metadata: every index tensor a view of one int64 buffer (one host-to-device copy), each from
    a 16-byte boundary whatever the step's token and decode counts (Triton compiles a kernel again for a
    pointer off it, so an odd count would cost a served request a compile), with the values it describes."""
    from epplat.core.model.attention import build_attn_metadata
    for decodes, chunks in ((0, [(7, 7)]), (1, [(40, 3)]), (3, []), (2, [(5, 5), (33, 17)]), (5, [(18, 1 + 16)])):
        seqs = [(9 + i, 1, [i, 20 + i]) for i in range(decodes)]
        seqs += [(c, q, list(range(40 + 4 * j, 44 + 4 * j))) for j, (c, q) in enumerate(chunks)]
        meta = build_attn_metadata(seqs, 16, torch.device("cpu"), pad_block=99)
        views = [meta.slot_mapping, meta.decode_tables, meta.decode_lens, meta.prefill_desc, meta.prefill_tables]
        views = [v for v in views if v is not None]
        base = meta.slot_mapping.untyped_storage().data_ptr()
        assert all(v.untyped_storage().data_ptr() == base and v.data_ptr() % 16 == 0 for v in views), decodes
        assert meta.slot_mapping.tolist()[:decodes] == [[i, 20 + i][(8 + i) // 16] * 16 + (8 + i) % 16
                                                       for i in range(decodes)]
        if decodes:
            assert meta.decode_lens.tolist() == [9 + i for i in range(decodes)]
            assert meta.decode_tables[:, 0].tolist() == list(range(decodes))
        q_start = decodes
        for j, ((c, q), p) in enumerate(zip(chunks, meta.prefills)):
            assert meta.prefill_desc[j].tolist()[:3] == [q_start, q, c] == [p.q_start, p.q_end - p.q_start,
                                                                            p.context_len]
            assert p.block_table.tolist() == list(range(40 + 4 * j, 40 + 4 * j + -(-c // 16)))
            q_start += q
