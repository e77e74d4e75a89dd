"""vLLM's request rules on the logits (penalties, logit_bias, allowed_token_ids, bad_words,
min_tokens) against a plain torch reference of each rule, written out one token at a time, as
the distribution the sampler draws from (``sampling_probs``) and as greedy tokens, every rule in
one batch beside rows without rules. tests/test_request_fields.py checks them through the server.
"""

from __future__ import annotations

import math

import pytest
import torch

from epplat.core.engine.protocol import EngineRequest, SamplingParams
from epplat.core.engine.request import Request
from epplat.core.engine.sampler import sample, sampling_probs

V = 12
LOGITS = torch.tensor([1.3, -0.4, 2.9, 0.2, 2.1, -1.7, 0.9, 2.6, -0.9, 1.8, 0.0, -2.5])
PROMPT = [3, 5, 2]
OUTPUT = [7, 7, 4, 9, 7]
EOS = 2


def reference(logits: torch.Tensor, p: dict, prompt=PROMPT, output=OUTPUT) -> torch.Tensor:
    """The rules of vLLM's sampler in its order, token by token."""
    x = logits.double().clone()
    if p.get("allowed_token_ids") is not None:
        for t in range(V):
            if t not in p["allowed_token_ids"]:
                x[t] = -math.inf
    for word in p.get("bad_words_token_ids", []):
        prefix = word[:-1]
        if not prefix or (len(prefix) <= len(output) and output[len(output) - len(prefix):] == prefix):
            x[word[-1]] = -math.inf
    if len(output) < p.get("min_tokens", 0):
        for t in p.get("stop_token_ids", []) + ([] if p.get("ignore_eos") else [EOS]):
            x[t] = -math.inf
    for t, b in p.get("logit_bias", {}).items():
        x[t] += b
    rp = p.get("repetition_penalty", 1.0)
    for t in set(prompt) | set(output):
        x[t] = x[t] / rp if x[t] > 0 else x[t] * rp
    for t in set(output):
        x[t] -= p.get("frequency_penalty", 0.0) * output.count(t) + p.get("presence_penalty", 0.0)
    return x


RULES = {
    "repetition_penalty 1.8": dict(repetition_penalty=1.8),
    "repetition_penalty 0.5": dict(repetition_penalty=0.5),
    "frequency_penalty 0.7": dict(frequency_penalty=0.7),
    "frequency_penalty -0.4": dict(frequency_penalty=-0.4),
    "presence_penalty 1.1": dict(presence_penalty=1.1),
    "logit_bias": dict(logit_bias={0: 3.0, 2: -100.0, 11: 5.5}),
    "allowed_token_ids": dict(allowed_token_ids=[1, 4, 6, 11]),
    "bad_words": dict(bad_words_token_ids=[[2], [9, 7, 8], [7, 0], [4, 4, 3]]),
    "min_tokens not reached": dict(min_tokens=6, stop_token_ids=[7]),
    "min_tokens reached": dict(min_tokens=5, stop_token_ids=[7]),
    "min_tokens, ignore_eos": dict(min_tokens=6, stop_token_ids=[7], ignore_eos=True),
    "all of them": dict(repetition_penalty=1.3, frequency_penalty=0.3, presence_penalty=0.2,
                        logit_bias={10: 2.0, 7: 1.0}, allowed_token_ids=[0, 2, 4, 7, 9, 10],
                        bad_words_token_ids=[[4], [7, 9]], min_tokens=9),
}


def request(output=OUTPUT, **params) -> Request:
    r = Request(EngineRequest("r", PROMPT, SamplingParams(**params), eos_token_ids=[EOS]))
    r.token_ids += output
    return r


def test_each_rule_changes_the_distribution():
    """So that a sampler ignoring a rule (or applying it to the wrong tokens) fails the tests below."""
    plain = LOGITS.softmax(-1).double()
    for name, p in RULES.items():
        if name != "min_tokens reached":
            assert (reference(LOGITS, p).softmax(-1) - plain).abs().max() > 0.01, name
    assert torch.equal(reference(LOGITS, RULES["min_tokens reached"]), LOGITS.double())


@pytest.mark.parametrize("temperature", [0.8, 1.0])
def test_sampling_probs_equal_the_reference_in_one_batch(temperature):
    names = list(RULES)
    # rows without rules in between, and every row its own logits
    logits = torch.stack([LOGITS.roll(i) for i in range(2 * len(names))])
    reqs = []
    for name in names:
        reqs += [request(temperature=temperature, **RULES[name]), request(temperature=temperature)]
    got = sampling_probs(logits, reqs)
    for i, name in enumerate(names):
        ref = (reference(logits[2 * i], RULES[name]) / temperature).softmax(-1).float()
        torch.testing.assert_close(got[2 * i], ref, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(got[2 * i + 1], (logits[2 * i + 1] / temperature).softmax(-1), msg=name)


def test_greedy_tokens_follow_the_rules_and_logprobs_stay_raw():
    names = list(RULES)
    logits = torch.stack([LOGITS.roll(i) for i in range(len(names))])
    reqs = [request(temperature=0.0, logprobs=0, **RULES[n]) for n in names]
    tokens, lps = sample(logits, reqs)
    for i, name in enumerate(names):
        assert tokens[i] == int(reference(logits[i], RULES[name]).argmax()), name
        raw = logits[i].log_softmax(-1)
        assert math.isclose(lps[i][0].logprob, float(raw[tokens[i]]), abs_tol=1e-6), name


def test_a_bad_word_bans_only_after_its_prefix():
    word = [[9, 7, 8]]
    assert reference(LOGITS, dict(bad_words_token_ids=word), output=[1, 9, 7])[8] == -math.inf
    got = sampling_probs(LOGITS[None].repeat(2, 1), [request(output=[1, 9, 7], bad_words_token_ids=word),
                                                     request(output=[9, 1, 7], bad_words_token_ids=word)])
    assert got[0, 8] == 0 and got[1, 8] > 0


def test_speculative_rows_count_the_drafts_before_them():
    """Rows of one request being verified with drafts: row j sees drafts[:j] as output too."""
    r = request(frequency_penalty=0.9)
    r.spec_token_ids = [2, 2]
    got = sampling_probs(LOGITS[None].repeat(3, 1), [r, r, r])
    for j in range(3):
        ref = reference(LOGITS, dict(frequency_penalty=0.9), output=OUTPUT + [2, 2][:j]).softmax(-1).float()
        torch.testing.assert_close(got[j], ref, atol=1e-6, rtol=1e-5)
