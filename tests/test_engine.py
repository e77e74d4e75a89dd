"""The engine core in-process (no server): greedy tokens against transformers, chunked
prefill, preemption under a tiny KV cache, aborts, seeds and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from epplat.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, SchedulerConfig
from epplat.core.engine.core import EngineCore
from epplat.core.engine.protocol import EngineRequest, SamplingParams
from epplat.platforms.cpu.platform import CpuPlatform
from hf_oracle import hf_greedy

PROMPTS = [[5, 17, 99, 230, 7, 64, 300, 12, 45, 81, 9], [400, 401], list(range(100, 150)), [3]]


def make_core(model_dir, blocks=None, budget=2048, max_len=None, block_size=16, max_seqs=64):
    cfg = EngineConfig(ModelConfig(str(model_dir), dtype="float32", max_model_len=max_len),
                       scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget),
                       cache=CacheConfig(block_size=block_size, num_gpu_blocks_override=blocks,
                                         kv_cache_memory_bytes=64 << 20))
    return EngineCore(cfg, CpuPlatform(), torch.device("cpu"))


def run(core, prompts, params_list):
    out = {str(i): [] for i in range(len(prompts))}
    lps = {str(i): [] for i in range(len(prompts))}
    for i, (p, sp) in enumerate(zip(prompts, params_list)):
        core.add_request(EngineRequest(str(i), p, sp, eos_token_ids=[]))
    steps = 0
    while core.has_work():
        for o in core.step():
            out[o.request_id] += o.new_token_ids
            if o.logprobs:
                lps[o.request_id] += o.logprobs
        steps += 1
        assert steps < 10_000
    return [out[str(i)] for i in range(len(prompts))], [lps[str(i)] for i in range(len(prompts))]


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("budget", [2048, 7])
def test_greedy_matches_transformers(arch, budget, request):
    model_dir = request.getfixturevalue(f"{arch}_dir")
    core = make_core(model_dir, budget=budget)
    got, _ = run(core, PROMPTS, [greedy(12)] * len(PROMPTS))
    assert got == hf_greedy(model_dir, PROMPTS, 12, ignore_eos=True)
    assert core.blocks.num_free == core.num_blocks


def test_preemption_under_tiny_kv_cache(qwen3_moe_dir):
    # 12 blocks of 4 tokens: each request needs up to 5 blocks, eight of them cannot all fit.
    core = make_core(qwen3_moe_dir, blocks=12, block_size=4, max_len=48)
    prompts = [[i + 1, 2 * i + 3, 50 + i, 7] for i in range(8)]
    got, _ = run(core, prompts, [greedy(14)] * len(prompts))
    assert core.scheduler.num_preemptions > 0
    assert got == hf_greedy(qwen3_moe_dir, prompts, 14, ignore_eos=True)
    assert core.blocks.num_free == core.num_blocks


def test_kv_cache_smaller_than_max_model_len_is_refused(qwen3_moe_dir):
    with pytest.raises(ConfigError, match="max-model-len"):
        make_core(qwen3_moe_dir, blocks=2, block_size=4, max_len=64)


def test_abort_frees_blocks(qwen3_moe_dir):
    core = make_core(qwen3_moe_dir)
    core.add_request(EngineRequest("a", list(range(1, 40)), greedy(100)))
    core.step()
    assert core.blocks.num_free < core.num_blocks
    outs = core.abort(["a"])
    assert outs[0].finish_reason == "abort"
    assert core.blocks.num_free == core.num_blocks and not core.has_work()


def test_stop_token_ids_and_max_tokens(qwen3_moe_dir):
    core = make_core(qwen3_moe_dir)
    ref, _ = run(core, [PROMPTS[0]], [greedy(8)])
    stop_at = ref[0][3]
    got, _ = run(core, [PROMPTS[0]], [SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_at])])
    assert got[0] == ref[0][: ref[0].index(stop_at) + 1]


def test_seeded_sampling_is_reproducible_and_batch_independent(qwen3_moe_dir):
    core = make_core(qwen3_moe_dir)
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone, _ = run(core, [PROMPTS[0]], [sp])
    batched, _ = run(core, [PROMPTS[1], PROMPTS[0], PROMPTS[2]],
                     [SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True), sp, greedy(10)])
    assert batched[1] == alone[0]
    other, _ = run(core, [PROMPTS[0]], [SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True)])
    assert other[0] != alone[0]


def test_top_k_one_is_greedy(qwen3_moe_dir):
    core = make_core(qwen3_moe_dir)
    g, _ = run(core, PROMPTS[:2], [greedy(8)] * 2)
    k1, _ = run(core, PROMPTS[:2], [SamplingParams(max_tokens=8, temperature=0.8, top_k=1, ignore_eos=True)] * 2)
    assert g == k1


def test_logprobs_are_those_of_the_model(qwen3_moe_dir):
    from transformers import AutoModelForCausalLM
    core = make_core(qwen3_moe_dir)
    sp = SamplingParams(max_tokens=3, temperature=0, logprobs=4, ignore_eos=True)
    toks, lps = run(core, [PROMPTS[0]], [sp])
    hf = AutoModelForCausalLM.from_pretrained(qwen3_moe_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPTS[0]])).logits[0, -1]
    ref = torch.log_softmax(logits.float(), -1)
    first = lps[0][0]
    assert first[0].token_id == toks[0][0] and first[0].rank == 1
    assert math.isclose(first[0].logprob, float(ref[toks[0][0]]), abs_tol=1e-4)
    assert [e.token_id for e in first[1:]] == ref.topk(4).indices.tolist()
    assert [e.rank for e in first[1:]] == [1, 2, 3, 4]


@pytest.mark.parametrize("ckpt_dtype", ["bfloat16", "float16"])
def test_half_checkpoint_on_cpu_matches_transformers_in_bfloat16_and_says_why(ckpt_dtype, tmp_path, caplog):
    """--dtype auto on a bf16 / fp16 checkpoint: bfloat16 on the cpu platform (fp16 said), the
    C kernels' float32-only path said once; greedy tokens equal transformers' in bfloat16."""
    import logging

    from transformers import AutoModelForCausalLM

    from epplat.tools.make_model import make_model
    d = make_model("qwen3_moe", tmp_path / ckpt_dtype, layers=2, hidden=64, experts=8, top_k=2, heads=4, kv_heads=2,
                   head_dim=32, moe_intermediate=64, vocab_size=2048, seed=3, dtype=ckpt_dtype)
    cfg = EngineConfig(ModelConfig(str(d), dtype="auto"), cache=CacheConfig(kv_cache_memory_bytes=64 << 20))
    with caplog.at_level(logging.WARNING):
        core = EngineCore(cfg, CpuPlatform(), torch.device("cpu"))
    assert core.runner.dtype == torch.bfloat16
    notes = [r.getMessage() for r in caplog.records]
    assert sum("C kernels take float32 only: in bfloat16" in n for n in notes) == 1, notes
    assert sum("float16 checkpoint runs in bfloat16" in n for n in notes) == (ckpt_dtype == "float16"), notes
    prompts = PROMPTS[:3]
    got, _ = run(core, prompts, [greedy(8)] * len(prompts))
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    for p, g in zip(prompts, got):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=hf.generation_config.pad_token_id)[0, len(p):].tolist()
        assert g == ref


def test_float32_on_cpu_says_nothing_about_slower_paths(qwen3_moe_dir, caplog):
    import logging
    with caplog.at_level(logging.WARNING):
        make_core(qwen3_moe_dir)
    assert not [r for r in caplog.records if "C kernels take float32" in r.getMessage()]
