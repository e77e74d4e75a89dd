"""Structured output (vLLM's response_format / structured_outputs) through xgrammar, an optional extra.

The API server turns a request's constraint into a ``StructuredOutput`` (json schema, json_object,
regex or EBNF grammar; a choice becomes a grammar) and checks that it parses (``check``). The
engine core compiles it against the model's vocabulary (compiled grammars are cached) into one
matcher per request, on a thread of its own (xgrammar compiles without the GIL), so that the other
requests' steps do not wait for a compile: the request joins the scheduler once its matcher is ready.
Every step the matchers of the batch's constrained rows fill one packed token bitmask (one batched
xgrammar call at the step's launch: ``fill_bitmask``), which bans the disallowed tokens of those rows
of the logits in place before sampling: the platform's ``Kernels.apply_bitmask`` where it has one (the
cpu platform's C kernel reads the packed words), else torch ops on the logits' device (xgrammar's CPU
kernel takes ten times as long on a 32,000-token vocabulary); each sampled token advances its matcher.
A matcher that has reached its end allows only the stop tokens (the request's EOS), and the request
stops there. The masks must be filled after every earlier token was accepted (the step's launch).
"""

from __future__ import annotations

import functools
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from epplat.core.engine.protocol import StructuredOutput
from epplat.core.ops import TORCH, Kernels

if TYPE_CHECKING:
    from epplat.core.engine.request import Request

KINDS = ("json", "json_object", "regex", "grammar")


def xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise RuntimeError("structured output needs the xgrammar package: pip install 'epplat[structured]' "
                           "(or pip install xgrammar)") from None
    return xgrammar


def _grammar(spec: StructuredOutput):
    xgr = xgrammar()
    if spec.kind in ("json", "json_object"):      # json_object: any JSON object, as vLLM compiles it
        return xgr.Grammar.from_json_schema(spec.spec if spec.kind == "json" else '{"type": "object"}',
                                            any_whitespace=spec.any_whitespace)
    if spec.kind == "regex":
        return xgr.Grammar.from_regex(spec.spec)
    return xgr.Grammar.from_ebnf(spec.spec)


def check(spec: StructuredOutput) -> None:
    """ValueError (one line) when the constraint does not parse; RuntimeError when xgrammar is missing."""
    try:
        _grammar(spec)
    except RuntimeError as e:
        if "xgrammar package" in str(e):
            raise
        raise ValueError(f"invalid {spec.kind} for structured output: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text.split("] ", 1)[-1][:300]        # drop xgrammar's "[time] file:line:" prefix


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose only sentences are the choices (vLLM's structured_outputs.choice)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Grammars:
    """One engine's compiler: the model's vocabulary as xgrammar sees it, and compiled grammars by spec."""

    def __init__(self, tokenizer_dir: str, vocab_size: int):
        self.tokenizer_dir, self.vocab_size = tokenizer_dir, vocab_size
        self._lock = threading.Lock()
        self._compiler = None
        self._pool: Optional[ThreadPoolExecutor] = None

    def _compiled(self, spec: StructuredOutput):
        with self._lock:
            if self._compiler is None:
                xgr = xgrammar()
                from transformers import AutoTokenizer
                tok = AutoTokenizer.from_pretrained(self.tokenizer_dir)
                info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info)
                self._compile = functools.lru_cache(maxsize=256)(
                    lambda s: self._compiler.compile_grammar(_grammar(StructuredOutput(*s))))
            return self._compile((spec.kind, spec.spec, spec.any_whitespace))

    def matcher(self, spec: StructuredOutput, stop_token_ids: list[int]):
        """A fresh matcher for one request; its end allows only stop_token_ids."""
        return xgrammar().GrammarMatcher(self._compiled(spec), override_stop_tokens=stop_token_ids or None)

    def submit(self, spec: StructuredOutput, stop_token_ids: list[int]) -> Future:
        """``matcher`` on the compile thread: its future."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        return self._pool.submit(self.matcher, spec, stop_token_ids)


class Bitmask(NamedTuple):
    """The token bitmask of a batch's constrained rows: mask [len(rows), ceil(V / 32)] int32 (bit t % 32
    of word t // 32 set: token t allowed), rows their places in the batch."""

    mask: torch.Tensor
    rows: list[int]


_batch = None       # xgrammar's batch matcher, made on first use


def fill_bitmask(reqs: list[Request], vocab_size: int) -> Optional[Bitmask]:
    """The bitmask of the constrained rows of reqs, filled in one batched xgrammar call on this thread
    (a tenth of a millisecond for 16 rows: handing it to a thread cost more in GIL hand-offs than the fill);
    None when no row is constrained."""
    global _batch
    rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
    if not rows:
        return None
    xgr = xgrammar()
    if _batch is None:
        _batch = xgr.BatchGrammarMatcher(max_threads=1)
    mask = torch.empty(len(rows), (vocab_size + 31) // 32, dtype=torch.int32)     # the fill writes every word
    _batch.batch_fill_next_token_bitmask([reqs[i].grammar for i in rows], mask)
    return Bitmask(mask, rows)


_BITS: dict = {}      # device -> arange(32) int32


def allowed_tokens(mask: torch.Tensor, vocab_size: int, device) -> torch.Tensor:
    """A bitmask unpacked on device: [rows, vocab_size] bool, True where the token is allowed."""
    bits = _BITS.get(device)
    if bits is None:
        bits = _BITS[device] = torch.arange(32, dtype=torch.int32, device=device)
    words = mask.to(device, non_blocking=True)
    return ((words.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab_size]


def ban_disallowed(logits: torch.Tensor, mask: torch.Tensor, rows: list[int]) -> bool:
    """The torch path of Kernels.apply_bitmask: -inf in place in logits[rows] where the mask bans a token."""
    banned = ~allowed_tokens(mask, logits.shape[1], logits.device)
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(banned, float("-inf"))
    else:
        idx = torch.tensor(rows, device=logits.device)
        logits[idx] = logits[idx].masked_fill_(banned, float("-inf"))
    return True


def apply_grammars(logits: torch.Tensor, reqs: list[Request], bitmask: Optional[Bitmask] = None,
                   kernels: Kernels = TORCH, inplace: bool = False) -> torch.Tensor:
    """Ban, in every constrained row, the tokens its grammar does not allow next; bitmask: the step's
    ``fill_bitmask`` (filled here when not given); kernels: the platform's record (its ``apply_bitmask``).
    logits [B, V] float32, masked in place when inplace, else left as they are (a copy is masked)."""
    if bitmask is None:
        bitmask = fill_bitmask(reqs, logits.shape[1])
        if bitmask is None:
            return logits
    out = logits if inplace else logits.clone()
    kernel = kernels.apply_bitmask
    if kernel is None or not kernel(out, bitmask.mask, bitmask.rows):
        ban_disallowed(out, bitmask.mask, bitmask.rows)
    return out


def accept(req: Request, token: int) -> Optional[str]:
    """Advance the request's matcher; "stop" when its grammar has ended."""
    m = req.grammar
    if not m.accept_token(token):
        raise RuntimeError(f"request {req.request_id}: token {token} is outside its grammar")
    return "stop" if m.is_terminated() else None
