"""vLLM's offline API (`from epplat import LLM, SamplingParams`) on real engine processes: greedy tokens
equal transformers' for generate and chat, on one engine and on DP=2 with expert parallelism; the
outputs have vLLM's shape; keyword arguments are `epplat serve`'s flags."""

from __future__ import annotations

import pytest

from hf_oracle import hf_greedy

PROMPTS = ["The quick brown fox", "Experts are routed", "1, 2, 3, 4,"]


def check_greedy(llm, model_dir):
    from epplat import SamplingParams
    tok = llm.get_tokenizer()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8))
    want = hf_greedy(model_dir, [tok.encode(p) for p in PROMPTS], 8)
    assert [o.prompt for o in outs] == PROMPTS
    assert [o.prompt_token_ids for o in outs] == [tok.encode(p) for p in PROMPTS]
    assert [o.outputs[0].token_ids for o in outs] == want
    assert [o.outputs[0].text for o in outs] == [tok.decode(w, skip_special_tokens=True) for w in want]
    assert all(o.finished and o.outputs[0].finish_reason in ("length", "stop") for o in outs)

    messages = [{"role": "user", "content": "Which expert?"}]
    chat_ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False)
    (out,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6))
    assert out.prompt_token_ids == chat_ids
    assert out.outputs[0].token_ids == hf_greedy(model_dir, [chat_ids], 6)[0]
    return want


def test_offline_llm_single_engine(qwen3_moe_dir):
    from epplat import LLM, SamplingParams
    with pytest.raises(TypeError, match="not_a_flag"):
        LLM(str(qwen3_moe_dir), not_a_flag=1)
    llm = LLM(str(qwen3_moe_dir), dtype="float32", max_model_len=256, kv_cache_memory_bytes=1 << 26)
    try:
        want = check_greedy(llm, qwen3_moe_dir)
        # token-id prompts, n > 1 with a seed, logprobs, stop strings
        ids = llm.get_tokenizer().encode(PROMPTS[0])
        (out,) = llm.generate({"prompt_token_ids": ids}, SamplingParams(n=2, seed=7, max_tokens=5, logprobs=2))
        assert out.prompt is None and [c.index for c in out.outputs] == [0, 1]
        for c in out.outputs:
            assert len(c.token_ids) == len(c.logprobs) == 5
            assert all(len(lp) >= 2 and t in lp for t, lp in zip(c.token_ids, c.logprobs))
            assert c.cumulative_logprob == pytest.approx(sum(lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)))
        assert llm.generate([ids], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids == want[0]
        with pytest.raises(ValueError, match="SamplingParams: top_p"):
            SamplingParams(top_p=0)
    finally:
        llm.shutdown()


def test_offline_llm_dp2_expert_parallel(qwen3_moe_dir):
    from epplat import LLM
    llm = LLM(str(qwen3_moe_dir), dtype="float32", max_model_len=256, kv_cache_memory_bytes=1 << 26,
              data_parallel_size=2, enable_expert_parallel=True)
    try:
        check_greedy(llm, qwen3_moe_dir)
    finally:
        llm.shutdown()
