"""Speculative decoding with the checkpoint's MTP layer (``--speculative-config`` method deepseek_mtp).

A running request carries ``spec_token_ids``, the drafts proposed after its last step. The
next step feeds its last token and the drafts to the target model in one chunk and samples
a target token at every one of those positions; drafts are accepted while they equal the
target's token, and the first target token that differs (or the one after the last draft)
is kept too. Every emitted token is the target's own sample at its position, so greedy
output is the output without speculation; the drafts only decide how many come per step.

After each step the MTP layer runs over the positions the target model just computed
(inputs shifted by one: token p+1 with the target's hidden state at p) and drafts the
token after the request's newest one; with ``num_speculative_tokens`` N > 1 it runs N-1
more times on its own output, one position each, as vLLM does. Drafts stop where the
request's KV blocks end (the scheduler allocates N tokens ahead for running requests) and
before max_model_len.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from epplat.core.engine.model_runner import DraftInput

logger = logging.getLogger(__name__)


def accepted_count(targets: list[int], drafts: list[int]) -> int:
    """How many leading drafts equal the target tokens sampled before them."""
    n = 0
    while n < len(drafts) and n < len(targets) and drafts[n] == targets[n]:
        n += 1
    return n


@dataclass
class SpecStats:
    """Totals since the engine started, with vLLM's meanings (spec_decode_num_*)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list = field(default_factory=list)

    def add(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        for i in range(accepted):
            self.accepted_per_pos[i] += 1

    def engine_fields(self) -> dict:
        return {"spec_num_drafts": self.num_drafts, "spec_num_draft_tokens": self.num_draft_tokens,
                "spec_num_accepted_tokens": self.num_accepted_tokens}

    def log_line(self, since: "SpecStats") -> str:
        drafts = self.num_drafts - since.num_drafts
        drafted = self.num_draft_tokens - since.num_draft_tokens
        accepted = self.num_accepted_tokens - since.num_accepted_tokens
        per_pos = [(a - b) / max(drafts, 1) for a, b in zip(self.accepted_per_pos, since.accepted_per_pos)]
        return (f"SpecDecoding metrics: Mean acceptance length: {1 + accepted / max(drafts, 1):.2f}, "
                f"Accepted: {accepted} tokens, Drafted: {drafted} tokens, "
                f"Per-position acceptance rate: {', '.join(f'{p:.3f}' for p in per_pos)}, "
                f"Avg Draft acceptance rate: {100 * accepted / max(drafted, 1):.1f}%")


class MtpDrafter:
    """Proposes drafts with the model's ``mtp`` module after each target step."""

    def __init__(self, runner, num_speculative_tokens: int, max_model_len: int):
        self.runner, self.k = runner, num_speculative_tokens
        self.mtp = runner.model.mtp
        self.max_model_len = max_model_len
        self.stats = SpecStats(accepted_per_pos=[0] * num_speculative_tokens)
        self.logged = SpecStats(accepted_per_pos=[0] * num_speculative_tokens)
        self.last_log = time.monotonic()

    def log_every(self, interval: float) -> None:
        """The SpecDecoding metrics line, at most every ``interval`` seconds (with the engine's stats line)."""
        now = time.monotonic()
        if now - self.last_log < interval or self.stats.num_drafts == self.logged.num_drafts:
            return
        self.last_log = now
        logger.info(self.stats.log_line(self.logged))
        self.logged = SpecStats(self.stats.num_drafts, self.stats.num_draft_tokens, self.stats.num_accepted_tokens,
                                list(self.stats.accepted_per_pos))

    def _room(self, req) -> int:
        """Drafts that fit in the request's blocks and its length limits."""
        bs = self.runner.block_size
        blocks = len(req.block_table) * bs - req.num_tokens + 1      # KV slots for positions up to num_tokens-2+k
        left = min(req.params.max_tokens - req.num_output, self.max_model_len - req.num_tokens) - 1
        return max(0, min(self.k, blocks, left))

    def _pass(self, d, publish) -> torch.Tensor:
        if publish is not None:
            publish(d)                       # the TP workers run the same pass
        return self.runner.draft_forward(d)

    @torch.inference_mode()
    def propose(self, rows: list, publish=None, lockstep: bool = False) -> None:
        """rows: (request, first row in the step's hidden states, first position, positions computed and
        kept) of this step's requests, after their new tokens were appended. Sets each running request's
        spec_token_ids. ``publish`` sends each pass to the TP workers first. With ``lockstep`` (DP ranks
        whose MoE layers exchange tokens) every rank runs all k passes, empty ones included, so that
        the MTP layer's all2all collectives pair up across ranks whatever each rank drafts."""
        dev = self.runner.device
        ids, pos, seqs, take, src, drafting = [], [], [], [], [], []
        for req, row, start, kept in rows:
            req.spec_token_ids = []
            if kept <= 0 or req.finish_reason:
                continue
            ids.extend(req.token_ids[start + 1:start + kept + 1])
            pos.extend(range(start, start + kept))
            seqs.append((start + kept, kept, req.block_table))
            src.extend(range(row, row + kept))
            if start + kept == req.num_tokens - 1 and self._room(req):
                take.append(len(ids) - 1)
                drafting.append(req)
        if not ids and not lockstep:
            return
        out = self._pass(DraftInput(ids, pos, seqs, src, False), publish)
        rows_out = take
        for step in range(self.k):
            if step:
                live = [i for i, r in enumerate(drafting) if self._room(r) > step]
                if not live and not lockstep:
                    break
                rows_prev = [rows_out[i] for i in live]
                drafting = [drafting[i] for i in live]
                p = [r.num_tokens - 2 + step for r in drafting]      # the newest token, then each draft
                out = self._pass(DraftInput([r.spec_token_ids[-1] for r in drafting], p,
                                            [(q + 1, 1, r.block_table) for q, r in zip(p, drafting)], rows_prev, True),
                                 publish)
                rows_out = list(range(len(drafting)))
            if not drafting:
                if lockstep:
                    continue
                return
            h = out.index_select(0, torch.tensor(rows_out, device=dev))
            for r, t in zip(drafting, self.mtp.compute_logits(h).argmax(dim=-1).tolist()):
                r.spec_token_ids.append(t)
