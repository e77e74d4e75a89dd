"""CUDA platform (skipped without a GPU): the Triton decode kernel, CUDA graphs against
eager, and bfloat16 logits against the float32 transformers reference."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[5, 17, 99, 230, 7, 64, 300, 12, 45], [400, 401], list(range(100, 140)), [3]]


def test_triton_decode_attention_matches_a_gather_and_softmax():
    from epplat.platforms.cuda.triton_attention import decode_attention
    torch.manual_seed(0)
    b, h, kvh, d, bs, nblk = 5, 8, 2, 64, 16, 64
    k = torch.randn(nblk, bs, kvh, d, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(b, h, d, device="cuda")
    lens = torch.tensor([1, 17, 32, 100, 160], device="cuda", dtype=torch.int32)
    tables = torch.randperm(nblk, device="cuda")[: b * 10].view(b, 10).int()
    out = decode_attention(q, k, v, tables, lens, d ** -0.5)
    for i in range(b):
        keys = k[tables[i].long()].reshape(-1, kvh, d)[: lens[i]]
        vals = v[tables[i].long()].reshape(-1, kvh, d)[: lens[i]]
        keys, vals = keys.repeat_interleave(h // kvh, 1), vals.repeat_interleave(h // kvh, 1)
        att = torch.softmax(torch.einsum("hd,lhd->hl", q[i], keys) * d ** -0.5, -1)
        torch.testing.assert_close(out[i], torch.einsum("hl,lhd->hd", att, vals), atol=2e-3, rtol=2e-3)


def _core(model_dir, eager):
    from epplat.config import CacheConfig, EngineConfig, ModelConfig
    from epplat.core.engine.core import EngineCore
    from epplat.platforms.cuda.platform import CudaPlatform
    cfg = EngineConfig(ModelConfig(str(model_dir), dtype="bfloat16"), cache=CacheConfig(kv_cache_memory_bytes=64 << 20),
                       platform="cuda", enforce_eager=eager)
    return EngineCore(cfg, CudaPlatform(), CudaPlatform().device(0))


def _greedy(core, n=10):
    from epplat.core.engine.protocol import EngineRequest, SamplingParams
    out = {str(i): [] for i in range(len(PROMPTS))}
    for i, p in enumerate(PROMPTS):
        core.add_request(EngineRequest(str(i), p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
    while core.has_work():
        for o in core.step():
            out[o.request_id] += o.new_token_ids
    return [out[str(i)] for i in range(len(PROMPTS))]


def test_cuda_graphs_give_the_eager_tokens(qwen3_moe_dir):
    graphed = _core(qwen3_moe_dir, eager=False)
    assert graphed.runner.graph.sizes, "no CUDA graph was captured"
    assert _greedy(graphed) == _greedy(_core(qwen3_moe_dir, eager=True))


def test_bf16_logits_within_tolerance_of_the_fp32_reference(qwen3_moe_dir):
    from transformers import AutoModelForCausalLM
    core = _core(qwen3_moe_dir, eager=True)
    hf = AutoModelForCausalLM.from_pretrained(qwen3_moe_dir, dtype=torch.float32)
    from epplat.core.engine.protocol import EngineRequest, SamplingParams
    from epplat.core.engine.request import Request
    req = Request(EngineRequest("a", PROMPTS[2], SamplingParams(max_tokens=1)))
    core.blocks.allocate(req, len(PROMPTS[2]))
    mi, rows, _ = core.runner.prepare([(req, len(PROMPTS[2]))])
    with torch.inference_mode():
        ours = core.runner.model.compute_logits(core.runner.forward(mi)).float().cpu()
        ref = hf(torch.tensor([PROMPTS[2]])).logits[0].float()
    # bf16 weights and activations: logits within 5% of the reference's spread, per position
    err = (ours - ref).abs().max(dim=-1).values / ref.std(dim=-1)
    assert err.max() < 0.05, err
