"""The sampler against a plain torch reference of each rule (temperature, min-p, top-k,
top-p, in vLLM's order), both as the distribution it draws from and as the frequencies
of many seeded draws through ``sample`` itself, over a 12-token vocabulary and over one
of 6,000 (wide enough for the sampler's partial selections to widen).

Statistical bound: with N draws from a distribution p, the count of token t is
Binomial(N, p_t); the tests require |count/N - p_t| <= 5 * sqrt(p_t (1 - p_t) / N) + 1/N
for every token (a 5-sigma band: a correct sampler leaves it with probability < 1e-5 per
token; the draws are seeded, so a run repeats exactly), and a count of exactly zero for
every token the rules drop.
"""

from __future__ import annotations

import math

import pytest
import torch

from epplat.core.engine.protocol import EngineRequest, SamplingParams
from epplat.core.engine.request import Request
from epplat.core.engine.sampler import sample, sampling_probs

# 12 distinct logits, not sorted, so that a rule applied in the wrong order or to the
# wrong positions changes the result
LOGITS = torch.tensor([1.3, -0.4, 2.9, 0.2, 2.1, -1.7, 0.9, 2.6, -0.9, 1.8, 0.0, -2.5])


def reference_probs(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """vLLM's sampling distribution written out plainly, one rule after another, in vocab order."""
    x = logits.double() / temperature
    if min_p > 0:
        p = x.softmax(-1)
        x = torch.where(p < min_p * p.max(), -math.inf, x)
    if top_k > 0:
        kth = x.topk(top_k).values[-1]
        x = torch.where(x < kth, -math.inf, x)
    if top_p < 1:
        # keep a token when the tokens more probable than it hold less than top_p
        p, order = x.softmax(-1).sort(descending=True)
        keep = torch.empty(len(p), dtype=torch.bool)
        keep[order] = (p.cumsum(-1) - p) < top_p
        x = torch.where(keep, x, -math.inf)
    return x.softmax(-1).float()


CASES = {
    "temperature 0.6": dict(temperature=0.6),
    "temperature 1.7": dict(temperature=1.7),
    "top_k 3": dict(top_k=3),
    "top_p 0.7": dict(top_p=0.7),
    "min_p 0.2": dict(min_p=0.2),
    "temperature 1.4, min_p 0.3, top_p 0.8": dict(temperature=1.4, min_p=0.3, top_p=0.8),
    "temperature 0.8, top_k 5, top_p 0.9": dict(temperature=0.8, top_k=5, top_p=0.9),
}


# A vocabulary far larger than the first selection a top-p row looks at (the sampler's
# FIRST_CANDIDATES, 512 today), so that partial selections, their widening and the full sort
# all run: a flat distribution whose top-p set holds thousands of tokens and a peaked one.
BIG = torch.randn(6000, generator=torch.Generator().manual_seed(0)) * 3
BIG_CASES = {
    "flat, top_p 0.9": dict(temperature=3.0, top_p=0.9),
    "peaked, top_p 0.9": dict(temperature=0.5, top_p=0.9),
    "flat, min_p 0.02, top_p 0.7": dict(temperature=2.0, min_p=0.02, top_p=0.7),
    "top_k 40, min_p 0.05": dict(top_k=40, min_p=0.05),
    "top_k 3000, top_p 0.8": dict(temperature=3.0, top_k=3000, top_p=0.8),
    "min_p 0.01": dict(min_p=0.01),
}


def requests(n, seed=None, **params) -> list[Request]:
    return [Request(EngineRequest(str(i), [1], SamplingParams(seed=None if seed is None else seed + i, **params)))
            for i in range(n)]


def within_bound(counts: torch.Tensor, p: torch.Tensor) -> list[str]:
    n = int(counts.sum())
    bad = []
    for t, (c, q) in enumerate(zip(counts.tolist(), p.tolist())):
        if q == 0:
            if c:
                bad.append(f"token {t}: dropped by the rules, drawn {c} times")
        elif abs(c / n - q) > 5 * math.sqrt(q * (1 - q) / n) + 1 / n:
            bad.append(f"token {t}: frequency {c / n:.4f}, probability {q:.4f}")
    return bad


def test_reference_rules_do_something():
    """Each case's distribution differs from plain softmax, and its filters drop tokens, so a
    sampler that ignores a rule cannot match the reference by accident."""
    plain = LOGITS.softmax(-1)
    for name, params in CASES.items():
        ref = reference_probs(LOGITS, **params)
        assert (ref - plain).abs().max() > 0.02, name
        if set(params) != {"temperature"}:
            assert 0 < int((ref == 0).sum()) < len(LOGITS) - 1, name


@pytest.mark.parametrize("name", list(CASES))
def test_sampling_probs_equal_the_reference(name):
    params = CASES[name]
    got = sampling_probs(LOGITS[None].repeat(2, 1), requests(2, **params))
    ref = reference_probs(LOGITS, **params)
    torch.testing.assert_close(got[0], ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], ref, atol=1e-6, rtol=1e-5)


def test_big_vocabulary_cases_need_wide_selections():
    kept = {name: int((reference_probs(BIG, **params) > 0).sum()) for name, params in BIG_CASES.items()}
    assert kept["flat, top_p 0.9"] > 2 * 512 and kept["top_k 3000, top_p 0.8"] > 512, kept
    assert 1 < kept["peaked, top_p 0.9"] < 512 and 1 < kept["top_k 40, min_p 0.05"] < 40, kept


@pytest.mark.parametrize("name", list(BIG_CASES))
def test_sampling_probs_equal_the_reference_over_a_big_vocabulary(name):
    got = sampling_probs(BIG[None], requests(1, **BIG_CASES[name]))[0]
    ref = reference_probs(BIG, **BIG_CASES[name])
    assert torch.equal(got > 0, ref > 0)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["flat, min_p 0.02, top_p 0.7", "top_k 40, min_p 0.05"])
def test_draw_frequencies_over_a_big_vocabulary(name):
    params = BIG_CASES[name]
    torch.manual_seed(0)
    counts = torch.zeros(len(BIG), dtype=torch.long)
    for _ in range(5):      # 10,000 draws in batches of 2,000 rows
        tokens, _ = sample(BIG[None].expand(2000, -1).contiguous(), requests(2000, **params))
        counts += torch.bincount(torch.tensor(tokens), minlength=len(BIG))
    assert within_bound(counts, reference_probs(BIG, **params)) == []


def test_rows_of_one_batch_keep_their_own_rules():
    names = list(CASES)
    logits = torch.stack([LOGITS.roll(i) for i in range(len(names))])
    reqs = [requests(1, **CASES[n])[0] for n in names]
    got = sampling_probs(logits, reqs)
    for i, n in enumerate(names):
        torch.testing.assert_close(got[i], reference_probs(LOGITS.roll(i), **CASES[n]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_draw_frequencies_match_the_reference(name):
    params = CASES[name]
    n = 40_000
    torch.manual_seed(0)
    tokens, _ = sample(LOGITS[None].expand(n, -1).contiguous(), requests(n, **params))
    counts = torch.bincount(torch.tensor(tokens), minlength=len(LOGITS))
    assert within_bound(counts, reference_probs(LOGITS, **params)) == []


def test_seeded_requests_draw_from_the_reference_too():
    """Per-request generators (``seed``) take their own noise path; it must sample the same law."""
    params = CASES["temperature 1.4, min_p 0.3, top_p 0.8"]
    n = 4000
    tokens, _ = sample(LOGITS[None].expand(n, -1).contiguous(), requests(n, seed=1000, **params))
    counts = torch.bincount(torch.tensor(tokens), minlength=len(LOGITS))
    assert within_bound(counts, reference_probs(LOGITS, **params)) == []
    again, _ = sample(LOGITS[None].expand(n, -1).contiguous(), requests(n, seed=1000, **params))
    assert again == tokens


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    reqs = requests(1, temperature=0.0) + requests(1, temperature=1.0, top_k=2) + requests(1, temperature=1e-6)
    torch.manual_seed(0)
    logits = torch.stack([LOGITS, LOGITS, LOGITS.roll(3)])
    tokens, _ = sample(logits, reqs)
    assert tokens[0] == int(LOGITS.argmax()) and tokens[2] == int(LOGITS.roll(3).argmax())
    assert tokens[1] in LOGITS.topk(2).indices.tolist()


def test_logprobs_are_of_the_raw_logits_whatever_the_rules():
    reqs = requests(1, temperature=0.5, top_k=2, logprobs=3)
    torch.manual_seed(0)
    tokens, lps = sample(LOGITS[None].clone(), reqs)
    ref = LOGITS.log_softmax(-1)
    chosen, *top = lps[0]
    assert chosen.token_id == tokens[0] and math.isclose(chosen.logprob, float(ref[tokens[0]]), abs_tol=1e-6)
    assert chosen.rank == int((ref > ref[tokens[0]]).sum()) + 1
    assert [e.token_id for e in top] == ref.topk(3).indices.tolist()
    assert all(math.isclose(e.logprob, float(ref[e.token_id]), abs_tol=1e-6) for e in top)
