"""vLLM's request fields through the real server and the openai client, against a plain torch
reference of each rule on transformers' logits (greedy decoding of the same checkpoint with the
rule applied at every step): penalties, logit_bias, allowed_token_ids, bad_words, min_tokens
(with stop tokens and stop strings), prompt_logprobs (chunked, and twice: no prefix-cache hit),
truncate_prompt_tokens, return_tokens_as_token_ids, and priority under --scheduling-policy priority.
Every case also checks that its rule changes the output, so that an ignored field fails.
(tests/test_logits_rules.py checks the rules' distributions in the sampler.)
"""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest
import torch

from hf_oracle import _model
from server_utils import Server

PROMPT = "the the the the"      # the checkpoint's greedy output repeats a token within N: positive penalties act
N = 8


@pytest.fixture(scope="module")
def server(qwen3_moe_dir):
    with Server(str(qwen3_moe_dir), "--dtype", "float32", "--max-model-len", "4096", "--max-num-seqs", "1",
                "--max-num-batched-tokens", "32", "--scheduling-policy", "priority") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def tok(qwen3_moe_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(qwen3_moe_dir)


def hf_greedy_with(model_dir, prompt: list[int], n: int, rule=None, stop=()) -> list[int]:
    """Greedy tokens from transformers' logits with rule(logits, prompt, output) applied at each step."""
    model, out = _model(str(model_dir)), []
    for _ in range(n):
        with torch.no_grad():
            x = model(torch.tensor([prompt + out])).logits[0, -1].double()
        if rule is not None:
            x = rule(x.clone(), prompt, out)
        out.append(int(x.argmax()))
        if out[-1] in stop:
            break
    return out


def served_ids(client, prompt, n=N, **fields) -> list[int]:
    """The greedy tokens the server returns, read from logprobs with return_tokens_as_token_ids."""
    r = client.completions.create(model=None, prompt=prompt, max_tokens=n, temperature=0, logprobs=0,
                                  extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True, **fields})
    tokens = r.choices[0].logprobs.tokens
    assert all(t.startswith("token_id:") for t in tokens)
    assert r.usage.completion_tokens == len(tokens)
    return [int(t.removeprefix("token_id:")) for t in tokens]


def repetition(rp):
    def rule(x, prompt, out):
        for t in set(prompt) | set(out):
            x[t] = x[t] / rp if x[t] > 0 else x[t] * rp
        return x
    return rule


def counted(freq, pres):
    def rule(x, prompt, out):
        for t in set(out):
            x[t] -= freq * out.count(t) + pres
        return x
    return rule


def test_penalties_bias_and_bans_match_the_torch_reference(client, tok, qwen3_moe_dir):
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    plain = hf_greedy_with(qwen3_moe_dir, prompt, N)
    assert served_ids(client, prompt) == plain
    allowed = sorted(set(range(100, 160)) | {plain[3]})
    bias = {plain[0]: -100.0, plain[1]: -5.0, 77: 4.0}
    word = tok.decode([plain[2]])

    def allow(x, p, o):
        keep = torch.full_like(x, -math.inf)
        keep[allowed] = x[allowed]
        return keep

    def biased(x, p, o):
        for t, b in bias.items():
            x[t] += b
        return x

    bad_ids = {ids[0] for ids in (tok.encode(word.lstrip(), add_special_tokens=False),
                                  tok.encode(" " + word.lstrip(), add_special_tokens=False)) if len(ids) == 1}
    assert plain[2] in bad_ids

    def banned(x, p, o):
        x[list(bad_ids)] = -math.inf
        return x

    cases = [({"repetition_penalty": 1.6}, repetition(1.6)),
             ({"repetition_penalty": 0.3}, repetition(0.3)),
             ({"frequency_penalty": 0.5}, counted(0.5, 0.0)),
             ({"frequency_penalty": -1.5}, counted(-1.5, 0.0)),
             ({"presence_penalty": 1.0}, counted(0.0, 1.0)),
             ({"frequency_penalty": 0.5, "presence_penalty": 0.5, "repetition_penalty": 1.2},
              lambda x, p, o: counted(0.5, 0.5)(repetition(1.2)(x, p, o), p, o)),
             ({"logit_bias": {str(t): b for t, b in bias.items()}}, biased),
             ({"allowed_token_ids": allowed}, allow),
             ({"bad_words": [word]}, banned)]
    for fields, rule in cases:
        ref = hf_greedy_with(qwen3_moe_dir, prompt, N, rule)
        assert ref != plain, fields          # the rule matters here
        assert served_ids(client, prompt, **fields) == ref, fields
    chat = client.chat.completions.create(model=None, messages=[{"role": "user", "content": "hi"}], max_tokens=N,
                                          temperature=0, logprobs=True,
                                          extra_body={"allowed_token_ids": allowed, "ignore_eos": True,
                                                      "return_tokens_as_token_ids": True})
    ids = [int(c.token.removeprefix("token_id:")) for c in chat.choices[0].logprobs.content]
    assert len(ids) == N and set(ids) <= set(allowed)


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(client, tok, qwen3_moe_dir):
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    plain = hf_greedy_with(qwen3_moe_dir, prompt, N)
    stop = plain[1]
    assert served_ids(client, prompt, stop_token_ids=[stop])[-1] == stop and len(served_ids(
        client, prompt, stop_token_ids=[stop])) == 2

    def hold(x, p, o):
        if len(o) < 6:
            x[stop] = -math.inf
        return x

    ref = hf_greedy_with(qwen3_moe_dir, prompt, N, hold, stop={stop})
    got = served_ids(client, prompt, stop_token_ids=[stop], min_tokens=6)
    assert got == ref and len(got) >= 6 and stop not in got[:6]
    text = tok.decode(plain[:2])
    s = text[len(tok.decode(plain[:1])):]
    assert s.strip()
    r = client.completions.create(model=None, prompt=prompt, max_tokens=N, temperature=0, stop=[s],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens <= 2
    r = client.completions.create(model=None, prompt=prompt, max_tokens=N, temperature=0, stop=[s],
                                  extra_body={"ignore_eos": True, "min_tokens": 5})
    assert r.usage.completion_tokens >= 5


def test_prompt_logprobs_truncation_and_bad_values(server, client, tok, qwen3_moe_dir):
    text = " ".join(["mixture of experts routing"] * 12)        # longer than a 32-token prefill chunk
    prompt = tok.encode(text, add_special_tokens=False)
    assert len(prompt) > 40
    with torch.no_grad():
        ref = _model(str(qwen3_moe_dir))(torch.tensor([prompt])).logits[0].double().log_softmax(-1)
    for _ in range(2):                # the second time its blocks are in the prefix cache
        r = client.completions.create(model=None, prompt=text, max_tokens=1, temperature=0,
                                      extra_body={"prompt_logprobs": 2})
        plp = r.choices[0].prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        for p, entry in enumerate(plp[1:]):
            want = ref[p]
            tokn = prompt[p + 1]
            assert math.isclose(entry[str(tokn)]["logprob"], float(want[tokn]), abs_tol=1e-3)
            assert entry[str(tokn)]["rank"] == int((want > want[tokn]).sum()) + 1
            assert {int(t) for t in entry} == set(want.topk(2).indices.tolist()) | {tokn}
    chat = client.chat.completions.create(model=None, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    assert chat.model_extra["prompt_logprobs"][0] is None and len(chat.model_extra["prompt_logprobs"]) > 1

    r = client.completions.create(model=None, prompt=prompt, max_tokens=4, temperature=0,
                                  extra_body={"truncate_prompt_tokens": 7, "ignore_eos": True})
    assert r.usage.prompt_tokens == 7
    assert r.choices[0].text == tok.decode(hf_greedy_with(qwen3_moe_dir, prompt[-7:], 4))
    long = " ".join(["word"] * 4500)
    r = client.completions.create(model=None, prompt=long, max_tokens=2, extra_body={"truncate_prompt_tokens": 100})
    assert r.usage.prompt_tokens == 100

    for body in ({"presence_penalty": 3}, {"repetition_penalty": 0}, {"logit_bias": {"x": 1}},
                 {"logit_bias": {"999999": 1}}, {"min_tokens": 20, "max_tokens": 4}, {"allowed_token_ids": []},
                 {"allowed_token_ids": [10 ** 7]}, {"prompt_logprobs": 21}, {"truncate_prompt_tokens": 4097}):
        resp = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, **body})
        assert resp.status_code == 400, (body, resp.text)
        assert "\n" not in resp.json()["error"]["message"]
    assert client.completions.create(model=None, prompt="still up", max_tokens=2).usage.completion_tokens >= 1


async def waiting(c) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    text = (await c.get("/metrics")).text
    return sum(x.value for f in text_string_to_metric_families(text) for x in f.samples
               if x.name == "vllm:num_requests_waiting")


def test_a_high_priority_request_overtakes_waiting_ones(server):
    """One sequence at a time (--max-num-seqs 1): while a long streamed request runs, three wait; when
    it is dropped, the one with the lowest priority value, sent last, runs first (fcfs: last), then the other
    two in their order of arrival."""
    async def run():
        done: list[str] = []
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            async def go(name, priority):
                r = await c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, "priority": priority,
                                                          "ignore_eos": True, "temperature": 0})
                assert r.status_code == 200, r.text
                done.append(name)
            rest = []
            async with c.stream("POST", "/v1/completions", json={"prompt": "hello", "max_tokens": 4000,
                                                                 "ignore_eos": True, "stream": True}) as long:
                lines = long.aiter_lines()          # kept: a dropped iterator may close the stream early
                async for line in lines:
                    if line.startswith("data:"):
                        break                       # it runs: the others queue behind it
                # each sent once the one before waits in the engine: low-1 arrives before low-2 (their tie on
                # priority goes to the first arrival), however long tokenizing each takes
                for n, (name, prio) in enumerate((("low-1", 5), ("low-2", 5), ("high", -1)), 1):
                    rest.append(asyncio.create_task(go(name, prio)))
                    for _ in range(300):
                        if await waiting(c) == n:
                            break
                        await asyncio.sleep(0.05)
                await lines.aclose()
            await asyncio.gather(*rest)             # the long one was dropped (aborted) above
        return done
    assert asyncio.run(run()) == ["high", "low-1", "low-2"]
