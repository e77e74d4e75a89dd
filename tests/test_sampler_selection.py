"""The sampler's partial selection: the distribution each row is drawn from equals a plain
full-sort computation of vLLM's rules, no row sorts the vocabulary unless top-p needs more
than the selection holds, and draws follow the distribution."""

from __future__ import annotations

import torch

from epplat.core.engine import sampler
from epplat.core.engine.protocol import EngineRequest, SamplingParams
from epplat.core.engine.request import Request


def _req(i, **kw):
    return Request(EngineRequest(request_id=str(i), prompt_token_ids=[1], params=SamplingParams(**kw)))


def _reference(logits, params):
    """vLLM's order over a full sort, one row at a time, in float64."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    vocab = logits.shape[1]
    for i, p in enumerate(params):
        vals, idx = (logits[i].double() / p["temperature"]).sort(descending=True)
        probs = vals.softmax(-1)
        keep = probs >= p.get("min_p", 0.0) * probs[0]
        k = p.get("top_k", 0)
        if 0 < k < vocab:
            keep[k:] = False
        keep[0] = True
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
        before = probs.cumsum(-1) - probs
        keep = before < p.get("top_p", 1.0)
        keep[0] = True
        probs = torch.where(keep, probs, 0.0)
        out[i, idx] = probs / probs.sum()
    return out


PARAMS = [
    dict(temperature=1.0),
    dict(temperature=0.7, min_p=0.05),
    dict(temperature=1.0, top_k=20),
    dict(temperature=0.5, top_k=50, top_p=0.8),
    dict(temperature=1.3, top_p=0.9),                  # wide: needs more than the first selection
    dict(temperature=0.2, top_p=0.95, min_p=0.01),     # peaked: the first selection holds the mass
    dict(temperature=1.0, top_k=5, min_p=0.2, seed=3),
    dict(temperature=1.0, top_p=0.5, seed=4),
]


def test_filtered_distribution_equals_full_sort_reference(monkeypatch):
    vocab = 4096
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(PARAMS), vocab, generator=g) * 3
    logits[5] *= 4                                  # a peaked row
    reqs = [_req(i, **p) for i, p in enumerate(PARAMS)]
    monkeypatch.setattr(sampler, "FIRST_CANDIDATES", 64)
    got = sampler.sampling_probs(logits, reqs).double()
    ref = _reference(logits, PARAMS)
    assert ((got - ref).abs().max(dim=1).values < 1e-5).all(), (got - ref).abs().max(dim=1).values
    assert ((got > 0) == (ref > 0)).all()


def test_no_vocabulary_sort_without_wide_top_p(monkeypatch):
    sorts = []
    real = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **kw: sorts.append(self.shape) or real(self, *a, **kw))
    vocab = 8192
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(1)) * 2
    logits[5] *= 8
    reqs = [_req(0, temperature=1.0), _req(1, temperature=0.8, min_p=0.1), _req(2, top_k=40),
            _req(3, top_k=40, top_p=0.9), _req(4, temperature=1.0, seed=5), _req(5, temperature=0.3, top_p=0.9)]
    tokens, _ = sampler.sample(logits, reqs)
    assert sorts == [] and len(tokens) == 6
    # a flat row under top-p widens to the whole vocabulary: the one case that sorts it
    sampler.sample(torch.zeros(1, vocab), [_req(6, top_p=0.99)])
    assert sorts == [(1, vocab)]


def test_draws_follow_the_distribution():
    vocab, n = 16, 40000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(2)).expand(n, vocab).contiguous()
    for params in (dict(temperature=1.0), dict(temperature=0.9, top_k=6, top_p=0.8), dict(top_p=0.7, min_p=0.05)):
        reqs = [_req(i, **params) for i in range(n)]
        probs = sampler.sampling_probs(logits[:1], reqs[:1])[0]
        tokens, _ = sampler.sample(logits, reqs)
        freq = torch.bincount(torch.tensor(tokens), minlength=vocab).double() / n
        assert (freq[probs == 0] == 0).all()
        assert (freq - probs.double()).abs().max() < 4 * (0.25 / n) ** 0.5, (params, freq, probs)


def test_seeded_row_ignores_its_batch():
    vocab = 1000
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(3))
    alone = [sampler.sample(logits[2:3], [_req(0, top_p=0.9, seed=11)])[0][0] for _ in range(2)]
    batch = [_req(0, temperature=1.0), _req(1, top_k=3), _req(2, top_p=0.9, seed=11), _req(3, top_p=0.5)]
    mixed = sampler.sample(logits, batch)[0][2]
    assert alone[0] == alone[1] == mixed


def test_banned_and_far_tokens_keep_the_reference_distribution():
    """Rows with -inf logits (a grammar's or logit_bias's bans) and logits so far below the best that
    exp leaves float32's normal range (their own exp path): the same distribution as the reference."""
    vocab = 4096
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, vocab, generator=g) * 3
    logits[:, 100:] = float("-inf")                 # banned: rows 0-2 keep 100 tokens
    logits[1, 50:100] -= 95.0                       # exp(-95) is a denormal float32: no mass
    logits[3, ::2] -= 120.0
    params = [dict(temperature=1.0), dict(temperature=1.0), dict(temperature=0.7, min_p=0.05, top_p=0.9),
              dict(temperature=1.0)]
    reqs = [_req(i, **p) for i, p in enumerate(params)]
    for r in reqs[:3]:
        r.has_rules = True                          # as a ban through logit_bias would mark them
    got = sampler.sampling_probs(logits, reqs).double()
    ref = _reference(torch.where(torch.isinf(logits), -1e30, logits), params)
    assert ((got - ref).abs().max(dim=1).values < 1e-5).all(), (got - ref).abs().max(dim=1).values
    assert (got[:3, 100:] == 0).all() and (got[1, 50:100] == 0).all() and (got[3, ::2] == 0).all()
    tokens, _ = sampler.sample(logits, reqs)
    assert all(t < 100 for t in tokens[:3])
