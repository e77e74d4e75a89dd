"""Request rules on the logits before sampling, with vLLM's meanings and in vLLM's order, in batch.

1. ``allowed_token_ids``: every other token is banned.
2. ``bad_words``: a bad word's last token is banned where the output ends with the rest of it
   (a one-token bad word always).
3. ``min_tokens``: EOS (unless ignore_eos) and ``stop_token_ids`` are banned while the output is shorter.
4. ``logit_bias``: added to the logits.
5. Penalties over the request's tokens: ``repetition_penalty`` divides a positive logit (multiplies a
   negative one) of every token seen in the prompt or the output; ``frequency_penalty`` times the
   token's count in the output and ``presence_penalty`` (once, when it is there) are subtracted.

A step gathers every row's banned and biased (row, token) pairs into one index write each and
the penalties into [rows, vocab] tensors built by scatters on the device: no loop over the
vocabulary. Rows of one request beyond the first (speculative drafts being verified) see the
drafts before them as output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from epplat.core.engine.request import Request


def has_rules(p) -> bool:
    """Whether a request's settings change its logits."""
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 or p.logit_bias
                or p.min_tokens or p.bad_words_token_ids or p.allowed_token_ids is not None)


def _rows(reqs: list[Request]) -> list[tuple[int, Request, list[int]]]:
    """(row, request, its output so far at that row) for rows whose request has rules."""
    out, seen = [], {}
    for i, r in enumerate(reqs):
        if not r.has_rules:
            continue
        j = seen[id(r)] = seen.get(id(r), -1) + 1
        out.append((i, r, r.output_ids + r.spec_token_ids[:j]))
    return out


def apply_rules(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """logits [B, V] float32 (left as they are) -> the logits to sample from."""
    rows = _rows(reqs)
    if not rows:
        return logits
    logits = logits.clone()
    vocab, dev = logits.shape[1], logits.device
    ban_r, ban_c, bias_r, bias_c, bias_v, allow_rows, allow_r, allow_c = [], [], [], [], [], [], [], []
    for i, r, out in rows:
        p = r.params
        if p.allowed_token_ids is not None:
            allow_r += [len(allow_rows)] * len(p.allowed_token_ids)
            allow_c += p.allowed_token_ids
            allow_rows.append(i)
        for word in p.bad_words_token_ids:
            if len(word) == 1 or (len(word) - 1 <= len(out) and out[len(out) - len(word) + 1:] == word[:-1]):
                ban_r.append(i)
                ban_c.append(word[-1])
        if len(out) < p.min_tokens:
            stops = list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(r.eos_token_ids))
            ban_r += [i] * len(stops)
            ban_c += stops
        if p.logit_bias:
            bias_r += [i] * len(p.logit_bias)
            bias_c += list(p.logit_bias)
            bias_v += list(p.logit_bias.values())
    if allow_rows:
        keep = torch.zeros(len(allow_rows), vocab, dtype=torch.bool, device=dev)
        keep[torch.tensor(allow_r, device=dev), torch.tensor(allow_c, device=dev)] = True
        idx = torch.tensor(allow_rows, device=dev)
        logits[idx] = logits[idx].masked_fill_(~keep, float("-inf"))
    if ban_r:
        logits[torch.tensor(ban_r, device=dev), torch.tensor(ban_c, device=dev)] = float("-inf")
    if bias_r:
        logits.index_put_((torch.tensor(bias_r, device=dev), torch.tensor(bias_c, device=dev)),
                          torch.tensor(bias_v, dtype=logits.dtype, device=dev), accumulate=True)
    pen = [(i, r, out) for i, r, out in rows
           if r.params.presence_penalty or r.params.frequency_penalty or r.params.repetition_penalty != 1.0]
    if pen:
        _penalize(logits, pen)
    return logits


def _counts(seqs: list[list[int]], vocab: int, dev) -> torch.Tensor:
    """[len(seqs), vocab] float32: how often each token occurs in each sequence."""
    width = max(1, max(map(len, seqs)))
    ids = torch.tensor([s + [vocab] * (width - len(s)) for s in seqs], dtype=torch.long, device=dev)
    counts = torch.zeros(len(seqs), vocab + 1, dtype=torch.float32, device=dev)
    return counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=dev))[:, :vocab]


def _penalize(logits: torch.Tensor, pen: list[tuple[int, Request, list[int]]]) -> None:
    vocab, dev = logits.shape[1], logits.device
    idx = torch.tensor([i for i, _, _ in pen], device=dev)
    prm = torch.tensor([[r.params.repetition_penalty, r.params.frequency_penalty, r.params.presence_penalty]
                        for _, r, _ in pen], dtype=torch.float32, device=dev)
    x = logits[idx]
    out_counts = _counts([out for _, _, out in pen], vocab, dev)
    if any(r.params.repetition_penalty != 1.0 for _, r, _ in pen):
        seen = (out_counts > 0) | (_counts([r.token_ids[:r.prompt_len] for _, r, _ in pen], vocab, dev) > 0)
        rp = torch.where(seen, prm[:, 0:1], 1.0)
        x = x * torch.where(x > 0, 1.0 / rp, rp)
    x = x - prm[:, 1:2] * out_counts - prm[:, 2:3] * (out_counts > 0)
    logits[idx] = x
