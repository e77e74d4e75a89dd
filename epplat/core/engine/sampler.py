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


def _sample_rows(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    dev = logits.device
    temp = torch.tensor([r.params.temperature for r in reqs], device=dev)
    logits = logits / temp[:, None]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in reqs], device=dev)
    ranks = torch.arange(vocab, device=dev)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([r.params.top_p for r in reqs], device=dev)
    cum = probs.cumsum(dim=-1) - probs          # mass strictly before each token
    drop = cum > top_p[:, None]
    min_p = torch.tensor([r.params.min_p for r in reqs], device=dev)
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    probs = probs.masked_fill(drop, 0.0)
    noise = torch.empty_like(probs).exponential_()
    for i, r in enumerate(reqs):
        if r.generator is not None:
            noise[i] = torch.empty(vocab).exponential_(generator=r.generator).to(dev)
    choice = (probs / noise).argmax(dim=-1)
    return sorted_idx.gather(1, choice[:, None]).squeeze(1)


def _token_logprobs(lp: torch.Tensor, token: int, n: int) -> list[TokenLogprob]:
    chosen = float(lp[token])
    rank = int((lp > lp[token]).sum()) + 1
    out = [TokenLogprob(token, chosen, rank)]
    if n > 0:
        vals, ids = lp.topk(n)
        out += [TokenLogprob(t, v, k + 1) for k, (t, v) in enumerate(zip(ids.tolist(), vals.tolist()))]
    return out
