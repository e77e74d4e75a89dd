"""Sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, and logprobs.

Logprobs are those of the model's raw distribution (before temperature and
filters), as vLLM returns by default. A seeded request draws its noise from its own
generator, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from typing import Optional

import torch

from epplat.core.engine.protocol import TokenLogprob
from epplat.core.engine.request import Request


def sample(logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[Optional[list[TokenLogprob]]]]:
    """logits: [B, V] float32, one row per request. Returns tokens and per-request logprobs."""
    logits = logits.float()
    greedy = [r.params.temperature <= 1e-5 for r in reqs]
    tokens = logits.argmax(dim=-1)
    if not all(greedy):
        rows = [i for i, g in enumerate(greedy) if not g]
        sub = _sample_rows(logits[rows], [reqs[i] for i in rows])
        tokens[rows] = sub
    token_list = tokens.tolist()
    logprobs: list[Optional[list[TokenLogprob]]] = [None] * len(reqs)
    want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    if want:
        lp = torch.log_softmax(logits[want], dim=-1)
        for j, i in enumerate(want):
            logprobs[i] = _token_logprobs(lp[j], token_list[i], reqs[i].params.logprobs)
    return token_list, logprobs


def sampling_probs(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """[B, V] in vocabulary order: the distribution each sampled row's token is drawn from.

    vLLM's order and meanings: logits / temperature; min-p drops tokens less probable than
    min_p times the most probable; top-k keeps the k most probable; top-p keeps the fewest
    most probable tokens whose mass (after min-p and top-k) reaches top_p. The survivors
    are renormalized. The most probable token always survives.
    """
    dev = logits.device
    temp = torch.tensor([r.params.temperature for r in reqs], device=dev)
    sorted_logits, sorted_idx = (logits.float() / temp[:, None]).sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    probs = sorted_logits.softmax(dim=-1)
    min_p = torch.tensor([r.params.min_p for r in reqs], device=dev)
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in reqs], device=dev)
    ranks = torch.arange(vocab, device=dev)[None, :]
    drop = (probs < min_p[:, None] * probs[:, :1]) | (ranks >= top_k[:, None])
    drop[:, 0] = False
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    top_p = torch.tensor([r.params.top_p for r in reqs], device=dev)
    drop = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)  # mass before each token
    drop[:, 0] = False
    probs = probs.masked_fill(drop, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, sorted_idx, probs)


def _sample_rows(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """One draw per row from ``sampling_probs`` (exponential-race: argmax of p / Exp(1) noise)."""
    probs = sampling_probs(logits, reqs)
    noise = torch.empty_like(probs).exponential_()
    for i, r in enumerate(reqs):
        if r.generator is not None:
            noise[i] = torch.empty(probs.shape[1]).exponential_(generator=r.generator).to(probs.device)
    return (probs / noise).argmax(dim=-1)


def _token_logprobs(lp: torch.Tensor, token: int, n: int) -> list[TokenLogprob]:
    chosen = float(lp[token])
    rank = int((lp > lp[token]).sum()) + 1
    out = [TokenLogprob(token, chosen, rank)]
    if n > 0:
        vals, ids = lp.topk(n)
        out += [TokenLogprob(t, v, k + 1) for k, (t, v) in enumerate(zip(ids.tolist(), vals.tolist()))]
    return out
