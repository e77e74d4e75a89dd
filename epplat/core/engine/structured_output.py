"""Structured output (vLLM's response_format / structured_outputs) through xgrammar, an optional extra.

The API server turns a request's constraint into a ``StructuredOutput`` (json schema, json_object,
regex or EBNF grammar; a choice becomes a grammar) and checks that it parses (``check``). The
engine core compiles it against the model's vocabulary (compiled grammars are cached) into one
matcher per request, on a thread of its own (xgrammar compiles without the GIL), so that the other
requests' steps do not wait for a compile: the request joins the scheduler once its matcher is ready.
Every step the matchers of the batch's constrained rows fill one token bitmask (one batched xgrammar
call, on the grammar thread while the step's forward runs: ``fill_bitmask``), which is unpacked and
applied to those rows of the logits on their device before sampling (torch ops: xgrammar's CPU kernel
takes ten times as long on a 32,000-token vocabulary), and each sampled token advances its matcher.
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


_filler: Optional[tuple] = None       # (the grammar thread, xgrammar's batch matcher), made on first use


def fill_bitmask(reqs: list[Request], vocab_size: int) -> Optional[Future]:
    """Start filling the bitmask of the constrained rows of reqs on the grammar thread (xgrammar fills
    without the GIL, so it overlaps the step's forward); the future of its ``Bitmask``. None when no
    row is constrained."""
    global _filler
    rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
    if not rows:
        return None
    xgr = xgrammar()
    if _filler is None:
        _filler = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask"),
                   xgr.BatchGrammarMatcher(max_threads=1))
    pool, batch = _filler
    mask = xgr.allocate_token_bitmask(len(rows), vocab_size)
    matchers = [reqs[i].grammar for i in rows]

    def fill() -> Bitmask:
        batch.batch_fill_next_token_bitmask(matchers, mask)
        return Bitmask(mask, rows)
    return pool.submit(fill)


_BITS: dict = {}      # device -> arange(32) int32


def allowed_tokens(mask: torch.Tensor, vocab_size: int, device) -> torch.Tensor:
    """A bitmask unpacked on device: [rows, vocab_size] bool, True where the token is allowed."""
    bits = _BITS.get(device)
    if bits is None:
        bits = _BITS[device] = torch.arange(32, dtype=torch.int32, device=device)
    words = mask.to(device, non_blocking=True)
    return ((words.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab_size]


def apply_grammars(logits: torch.Tensor, reqs: list[Request], bitmask: Optional[Future] = None) -> torch.Tensor:
    """Ban, in every constrained row, the tokens its grammar does not allow next; bitmask: the step's
    ``fill_bitmask`` (filled here when not given). logits [B, V] float32, left as they are."""
    if bitmask is None:
        bitmask = fill_bitmask(reqs, logits.shape[1])
        if bitmask is None:
            return logits
    mask, rows = bitmask.result()
    allowed = allowed_tokens(mask, logits.shape[1], logits.device)
    if len(rows) == len(reqs):       # a new tensor: the raw logits stay as they are (logprobs)
        return torch.where(allowed, logits, float("-inf"))
    out = logits.clone()
    idx = torch.tensor(rows, device=logits.device)
    out[idx] = torch.where(allowed, logits[idx], float("-inf"))
    return out


def accept(req: Request, token: int) -> Optional[str]:
    """Advance the request's matcher; "stop" when its grammar has ended."""
    m = req.grammar
    if not m.accept_token(token):
        raise RuntimeError(f"request {req.request_id}: token {token} is outside its grammar")
    return "stop" if m.is_terminated() else None
