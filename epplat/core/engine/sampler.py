"""Sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, and logprobs.

vLLM's order and meanings: logits / temperature; min-p drops tokens less probable than
min_p times the most probable; top-k keeps the k most probable; top-p keeps the fewest
most probable tokens whose mass (after min-p and top-k) reaches top_p; the survivors are
renormalized and the most probable token always survives.

No row sorts the vocabulary unless it must: rows with neither top-k nor top-p draw from
the softmax over the vocabulary (min-p is a threshold on it); top-k rows look only at
their k best tokens (``torch.topk``, a partial selection); top-p rows without top-k look
at a few hundred best tokens and widen the selection only while those hold less than
top_p of the mass (a full sort is the last of those widenings). Each draw takes one
uniform number (inverse CDF over the row's running mass). A seeded request is sampled on its own with noise from
its own generator, so its tokens do not depend on what else is in the batch.

Where the platform's Kernels record has ``sample``, rows that need only a temperature (no top-k,
top-p or min-p) are drawn by that kernel in one pass over the row instead: an exponential race
whose noise is a function of a 62-bit key and the token index. A seeded request's key is the next
number of its own generator (so its tokens still repeat from the seed, in any batch, after a
restart); the other rows take consecutive keys from one number of torch's global generator.

Request rules on the logits (penalties, logit_bias, bans: epplat.core.engine.logits_rules) come
first, for greedy rows too. Logprobs are those of the model's raw distribution (before the rules,
temperature and filters), as vLLM returns by default.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from epplat.core.engine.draws import FILTERED, GREEDY, SOFTMAX
from epplat.core.engine.logits_rules import apply_rules
from epplat.core.engine.protocol import TokenLogprob
from epplat.core.engine.structured_output import apply_grammars
from epplat.core.engine.request import Request
from epplat.core.ops import TORCH, Kernels

# best tokens a top-p row without top-k looks at first; widened by WIDEN while they hold less
# than top_p of the mass
FIRST_CANDIDATES = 512
WIDEN = 8


def sample(logits: torch.Tensor, reqs: list[Request], grammar_bitmask=None, kernels: Kernels = TORCH
           ) -> tuple[list[int], list[Optional[list[TokenLogprob]]]]:
    """logits: [B, V] float32, one row per request; grammar_bitmask: the step's (``fill_bitmask``);
    kernels: the platform's record (its ``sample`` draws the rows that need only a temperature).
    Returns tokens and per-request logprobs."""
    raw = logits.float()
    token_list = sample_tokens(raw, reqs, grammar_bitmask, kernels).tolist()
    return token_list, sampled_logprobs(raw, reqs, token_list)


def sample_tokens(logits: torch.Tensor, reqs: list[Request], grammar_bitmask=None, kernels: Kernels = TORCH
                  ) -> torch.Tensor:
    """The tokens, left on the logits' device (async scheduling reads them later). Float32 logits are
    masked by the grammars in place unless a request returns logprobs (of the raw logits)."""
    inplace = not any(r.params.logprobs is not None for r in reqs)
    logits = apply_rules(apply_grammars(logits.float(), reqs, grammar_bitmask, kernels, inplace), reqs)
    kinds = [r.draw for r in reqs]          # GREEDY, SOFTMAX or FILTERED, fixed per request (draws.py)
    top = max(kinds)
    if top == GREEDY:
        return logits.argmax(dim=-1)
    if top == FILTERED:                      # a top_k of the vocabulary or more narrows nothing
        vocab = logits.shape[1]
        kinds = [SOFTMAX if k == FILTERED and not (0 < r.params.top_k < vocab or r.params.top_p < 1.0
                                                    or r.params.min_p > 0) else k for k, r in zip(kinds, reqs)]
    if kernels.sample is None:               # the torch path draws every row that is not greedy
        kinds = [k and FILTERED for k in kinds]
    if kinds.count(kinds[0]) == len(kinds):
        return _tokens(kinds[0], logits, reqs, kernels)
    tokens = torch.empty(len(reqs), dtype=torch.long, device=logits.device)
    for kind in (GREEDY, SOFTMAX, FILTERED):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        if rows:
            tokens[rows] = _tokens(kind, logits[rows], [reqs[i] for i in rows], kernels)
    return tokens


def sampled_logprobs(raw: torch.Tensor, reqs: list[Request], token_list: list[int]) -> list[Optional[list[TokenLogprob]]]:
    """The logprobs of the sampled tokens (and the best alternatives) for requests that ask for them."""
    logprobs: list[Optional[list[TokenLogprob]]] = [None] * len(reqs)
    want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    if want:
        lp = torch.log_softmax(raw[want], dim=-1)
        for j, i in enumerate(want):
            logprobs[i] = _token_logprobs(lp[j], token_list[i], reqs[i].params.logprobs)
    return logprobs


class Filtered(NamedTuple):
    """The distribution of some rows: probs[i, j] is proportional to the probability of token
    ids[i, j] (of token j when ids is None) after the filters; every other token has none."""

    rows: list[int]
    probs: torch.Tensor
    ids: Optional[torch.Tensor]


def _narrow(p, vocab: int) -> bool:
    return 0 < p.top_k < vocab or p.top_p < 1.0


def filtered(logits: torch.Tensor, reqs: list[Request]) -> list[Filtered]:
    """The sampling distribution of every row, in groups of rows that share a way of computing it."""
    logits = logits.float()
    vocab = logits.shape[1]
    plain, narrow, seeded = [], [], []
    for i, r in enumerate(reqs):
        (seeded.append([i]) if r.generator is not None else (narrow if _narrow(r.params, vocab) else plain).append(i))
    out = []
    for rows in [g for g in (plain, narrow) if g] + seeded:
        sub = [r.params for r in (reqs[i] for i in rows)]
        x = logits[rows] if len(rows) < len(reqs) else logits
        is_narrow = _narrow(sub[0], vocab)
        prm = None
        if is_narrow or any(p.temperature != 1.0 or p.min_p > 0 for p in sub):
            # one host-to-device copy a group: temperature, top_p, log(min_p), top_k, no top-k
            prm = torch.tensor([[p.temperature, p.top_p, math.log(p.min_p) if p.min_p > 0 else -math.inf,
                                 p.top_k if 0 < p.top_k < vocab else vocab, not 0 < p.top_k < vocab] for p in sub],
                               dtype=torch.float32, device=x.device)
            if any(p.temperature != 1.0 for p in sub):
                x = x / prm[:, 0:1]
        if is_narrow:
            out.extend(_narrowed(x, [p.top_k if 0 < p.top_k < vocab else 0 for p in sub], rows, prm,
                                 any(p.min_p > 0 for p in sub), any(p.top_p < 1.0 for p in sub)))
        else:
            banned = any(reqs[i].grammar is not None or reqs[i].has_rules for i in rows)   # -inf logits
            out.append(Filtered(rows, _exp_min_p(x, prm[:, 2:3] if any(p.min_p > 0 for p in sub) else None, banned),
                                None))
    return out


def _exp_min_p(x: torch.Tensor, floor: Optional[torch.Tensor], banned: bool = False) -> torch.Tensor:
    """exp(x - max) over the vocabulary (the softmax, not yet normalized), zero where min-p drops
    (x - max below log(min_p)); banned: some logits may be -inf."""
    d = x - x.amax(dim=-1, keepdim=True)
    if floor is not None:
        d.masked_fill_(d < floor, float("-inf"))
    return _exp_le0(d) if banned or floor is not None else d.exp_()


# exp(-87.3) is float32's smallest normal number; below it (-inf included) the CPU's vectorized exp
# leaves its fast path (an exp over a row of -inf takes 4x, over denormal results 100x as long)
_EXP_FLOOR = -87.0


def _exp_le0(d: torch.Tensor) -> torch.Tensor:
    """exp of d <= 0 in place, zero below exp(_EXP_FLOOR) (where float32 has only denormals)."""
    low = d < _EXP_FLOOR
    return d.clamp_min_(_EXP_FLOOR).exp_().masked_fill_(low, 0.0)


def _narrowed(x: torch.Tensor, top_k: list[int], rows: list[int], prm: torch.Tensor, min_p: bool,
              top_p: bool) -> list[Filtered]:
    """Rows with top-k (0: none) or top-p over their best tokens only (a partial selection);
    min_p / top_p: whether any row has one. Weights are exp(logit - row max): nothing is
    normalized, and top-p compares running weight with top_p times the mass."""
    vocab = x.shape[1]
    dev = x.device
    no_k = [k == 0 for k in top_k]
    # with no top-k, top-p measures mass against every min-p survivor of the vocabulary
    full_mass = None
    if any(no_k):
        d = x - x.amax(dim=-1, keepdim=True)
        full_mass = _exp_le0(d.masked_fill_(d < prm[:, 2:3], float("-inf"))).sum(dim=-1)
    width = max([k for k in top_k if k] + ([min(vocab, FIRST_CANDIDATES)] if any(no_k) else []))
    todo = list(range(len(rows)))
    out = []
    while todo:
        sub = torch.tensor(todo, device=dev) if len(todo) < len(rows) else None
        xs, p = (x, prm) if sub is None else (x[sub], prm[sub])
        vals, ids = xs.topk(width, dim=-1) if width < vocab else xs.sort(dim=-1, descending=True)
        d = vals - vals[:, :1]
        drop = torch.arange(width, device=dev)[None, :] >= p[:, 3:4]
        if min_p:
            drop |= d < p[:, 2:3]
        drop[:, 0] = False
        w = d.masked_fill_(drop, float("-inf")).exp_()
        complete = [True] * len(todo)
        if top_p:
            mass = w.sum(dim=-1)
            if full_mass is not None:
                mass = torch.where(p[:, 4] > 0, full_mass if sub is None else full_mass[sub], mass)
            tp = p[:, 1:2] * mass[:, None]
            cum = w.cumsum(dim=-1)
            drop = ((cum - w) >= tp) & (p[:, 1:2] < 1)      # mass strictly before each token
            drop[:, 0] = False
            # a row without top-k is complete when its selection holds top_p of the mass: every
            # token past it then has at least that much before it
            if width < vocab and any(no_k[i] for i in todo):
                held = (cum[:, -1] >= tp[:, 0]).tolist()
                complete = [held[j] or not no_k[i] for j, i in enumerate(todo)]
            w = w.masked_fill_(drop, 0.0)
        done = [j for j, c in enumerate(complete) if c]
        if len(done) == len(todo):
            out.append(Filtered([rows[i] for i in todo], w, ids))
        elif done:
            dn = torch.tensor(done, device=dev)
            out.append(Filtered([rows[todo[j]] for j in done], w[dn], ids[dn]))
        todo = [i for j, i in enumerate(todo) if not complete[j]]
        width = min(vocab, width * WIDEN)
    return out


def sampling_probs(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """[B, V] in vocabulary order: the distribution each row's token is drawn from."""
    out = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    for f in filtered(apply_rules(apply_grammars(logits.float(), reqs), reqs), reqs):
        rows = torch.tensor(f.rows, device=logits.device)
        probs = f.probs / f.probs.sum(dim=-1, keepdim=True)
        if f.ids is None:
            out[rows] = probs
        else:
            out[rows] = torch.zeros_like(out[rows]).scatter_(1, f.ids, probs)
    return out


def _tokens(kind: int, logits: torch.Tensor, reqs: list[Request], kernels: Kernels) -> torch.Tensor:
    """Tokens of rows of one kind (see ``sample_tokens``)."""
    if kind == GREEDY:
        return logits.argmax(dim=-1)
    tok = _race(kernels.sample, logits, reqs) if kind == SOFTMAX else None
    return _sample_rows(logits, reqs) if tok is None else tok


def _race(kernel, logits: torch.Tensor, reqs: list[Request]) -> Optional[torch.Tensor]:
    """The Kernels.sample draw of rows that need only a temperature (None where the kernel declines)."""
    base = int(torch.randint(1 << 62, (1,)))
    gens = [r.generator for r in reqs]
    if gens.count(None) == len(gens):
        keys = base
    else:
        keys = torch.tensor([base + i if g is None else int(torch.randint(1 << 62, (1,), generator=g))
                             for i, g in enumerate(gens)])
    temps = [r.params.temperature for r in reqs]
    # per-row values stay on the host: the kernel moves them (a blocking copy here would wait for the step)
    temperature = temps[0] if temps.count(temps[0]) == len(temps) else torch.tensor(temps)
    return kernel(logits, temperature, keys)


def _sample_rows(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """One draw per row from its ``filtered`` distribution."""
    tokens = torch.empty(len(reqs), dtype=torch.long, device=logits.device)
    for f in filtered(logits, reqs):
        choice = _draw(f.probs, reqs[f.rows[0]].generator)
        tok = choice if f.ids is None else f.ids.gather(1, choice[:, None]).squeeze(1)
        if len(f.rows) == len(reqs):
            return tok
        tokens[torch.tensor(f.rows, device=logits.device)] = tok
    return tokens


def _draw(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Inverse-CDF draws, one uniform number a row: the first column whose running mass passes
    u * total (a column without mass never does). An exponential race would need a random
    number per column, and drawing those costs more than the rest of the sampler on a CPU."""
    cum = probs.cumsum(dim=-1)
    if generator is not None:
        u = torch.rand(probs.shape[0], 1, generator=generator).to(probs.device)
    else:
        u = torch.rand(probs.shape[0], 1, device=probs.device)
    # u < 1 - 2^-23 keeps u * total below total after rounding, so some column passes it
    return torch.searchsorted(cum, u.mul_(1 - 2 ** -23).mul_(cum[:, -1:]), right=True).squeeze(1)


def _token_logprobs(lp: torch.Tensor, token: int, n: int) -> list[TokenLogprob]:
    chosen = float(lp[token])
    rank = int((lp > lp[token]).sum()) + 1
    out = [TokenLogprob(token, chosen, rank)]
    if n > 0:
        vals, ids = lp.topk(n)
        out += [TokenLogprob(t, v, k + 1) for k, (t, v) in enumerate(zip(ids.tolist(), vals.tolist()))]
    return out


def token_logprobs(logits: torch.Tensor, tokens: list[int], num_top: list[int]) -> list[list[TokenLogprob]]:
    """For each row, the raw logprob and rank of tokens[row], then its num_top[row] best alternatives
    (prompt logprobs: the rows are prompt positions, the tokens the prompt tokens that follow them)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    tok = torch.tensor(tokens, device=lp.device)[:, None]
    chosen = lp.gather(1, tok)
    ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
    k = max(num_top)
    vals, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    out = []
    for t, c, rank, v, i, n in zip(tokens, chosen[:, 0].tolist(), ranks, vals.tolist(), ids.tolist(), num_top):
        out.append([TokenLogprob(t, c, rank)] + [TokenLogprob(a, b, j + 1) for j, (a, b) in enumerate(zip(i[:n], v[:n]))])
    return out
