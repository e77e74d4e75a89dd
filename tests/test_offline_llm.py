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


@pytest.fixture(scope="module")
def llm(qwen3_moe_dir):
    from epplat import LLM
    llm = LLM(str(qwen3_moe_dir), dtype="float32", max_model_len=256, kv_cache_memory_bytes=1 << 26)
    yield llm
    llm.shutdown()


def test_offline_llm_single_engine(llm, qwen3_moe_dir):
    from epplat import LLM, SamplingParams
    with pytest.raises(TypeError, match="not_a_flag"):
        LLM(str(qwen3_moe_dir), not_a_flag=1)
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


def test_offline_llm_dp2_expert_parallel(qwen3_moe_dir):
    from epplat import LLM
    llm = LLM(str(qwen3_moe_dir), dtype="float32", max_model_len=256, kv_cache_memory_bytes=1 << 26,
              data_parallel_size=2, enable_expert_parallel=True)
    try:
        check_greedy(llm, qwen3_moe_dir)
    finally:
        llm.shutdown()


def test_offline_request_fields_match_the_torch_reference(llm, qwen3_moe_dir):
    """The request fields the server takes, as vLLM's SamplingParams names them: penalties,
    logit_bias, allowed_token_ids, bad_words, min_tokens against transformers' logits with the same
    rule (test_request_fields.py's reference); prompt_logprobs against its log-softmax; structured
    outputs (xgrammar) that the random weights follow only because of the grammar."""
    import re

    import torch
    from epplat import SamplingParams, StructuredOutputsParams
    from hf_oracle import _model
    from test_request_fields import N, PROMPT, counted, hf_greedy_with, repetition
    tok = llm.get_tokenizer()
    prompt, n = tok.encode(PROMPT, add_special_tokens=False), N

    def ids(**fields):
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **fields)
        return llm.generate({"prompt_token_ids": prompt}, sp)[0].outputs[0].token_ids
    plain = hf_greedy_with(qwen3_moe_dir, prompt, n)
    assert ids() == plain
    bias = {plain[0]: -100.0, 77: 4.0}
    allowed = sorted(set(range(100, 160)) | {plain[3]})
    word = tok.decode([plain[2]])
    bad = {i[0] for i in (tok.encode(word.lstrip(), add_special_tokens=False),
                          tok.encode(" " + word.lstrip(), add_special_tokens=False)) if len(i) == 1}

    def biased(x, p, o):
        for t, b in bias.items():
            x[t] += b
        return x

    def allow(x, p, o):
        keep = torch.full_like(x, -torch.inf)
        keep[allowed] = x[allowed]
        return keep

    def banned(x, p, o):
        x[list(bad)] = -torch.inf
        return x
    cases = [({"repetition_penalty": 1.6}, repetition(1.6)),
             ({"frequency_penalty": 0.5, "presence_penalty": 0.5}, counted(0.5, 0.5)),
             ({"logit_bias": bias}, biased), ({"allowed_token_ids": allowed}, allow),
             ({"bad_words": [word]}, banned)]
    for fields, rule in cases:
        ref = hf_greedy_with(qwen3_moe_dir, prompt, n, rule)
        assert ref != plain and ids(**fields) == ref, fields

    # min_tokens: the stop token (here the first greedy one) is held back until then
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=n, stop_token_ids=[plain[0]], min_tokens=3))
    assert out[0].outputs[0].token_ids == hf_greedy_with(
        qwen3_moe_dir, prompt, n, lambda x, p, o: biased_out(x, o, plain[0], 3), stop=(plain[0],))

    (out,) = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1,
                                                                     prompt_logprobs=1))
    with torch.no_grad():
        want = _model(str(qwen3_moe_dir))(torch.tensor([prompt])).logits[0].double().log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for p, entry in enumerate(out.prompt_logprobs[1:]):
        t = prompt[p + 1]
        assert next(iter(entry)) == t and abs(entry[t].logprob - float(want[p, t])) < 1e-3

    regex = r"[A-Z][a-z]{2,5}-[0-9]{3}"
    outs = llm.generate(["Code:", "Name:"], SamplingParams(
        temperature=1.0, seed=3, max_tokens=40, structured_outputs=StructuredOutputsParams(regex=regex)))
    assert all(re.fullmatch(regex, o.outputs[0].text) and o.outputs[0].finish_reason == "stop" for o in outs)
    (out,) = llm.generate("Pick:", SamplingParams(structured_outputs=StructuredOutputsParams(choice=["yes", "no"]),
                                                  max_tokens=10))
    assert out.outputs[0].text in ("yes", "no")
    assert not re.fullmatch(regex, llm.generate("Code:", SamplingParams(temperature=1.0, seed=3,
                                                                        max_tokens=12))[0].outputs[0].text)
    for bad_fields in ({"presence_penalty": 3}, {"min_tokens": 20, "max_tokens": 4}, {"allowed_token_ids": []},
                       {"structured_outputs": StructuredOutputsParams(regex="([")}):
        with pytest.raises(ValueError, match="Params: "):
            SamplingParams(**bad_fields)
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate("x", SamplingParams(logit_bias={10 ** 7: 1.0}))
    (out,) = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, truncate_prompt_tokens=3))
    assert out.prompt_token_ids == prompt[-3:]


def biased_out(x, out, token: int, min_tokens: int):
    """min_tokens' rule: the stop token is banned while fewer than min_tokens were generated."""
    if len(out) < min_tokens:
        x[token] = -float("inf")
    return x
