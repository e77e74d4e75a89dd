"""vLLM's user-facing SamplingParams (and StructuredOutputsParams) for the offline API: its names and
defaults, turned into the engine's per-request settings (one per sample when n > 1), with the same
rules and checks as the server's request fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

from epplat.core.engine import protocol as P


@dataclass
class StructuredOutputsParams:
    """vLLM's: exactly one of json (a schema, dict or text), regex, choice, grammar (EBNF), json_object."""

    json: Optional[Union[str, dict]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    disable_any_whitespace: bool = False

    def engine_constraint(self) -> Optional[P.StructuredOutput]:
        from epplat.core.server.protocol import APIError
        from epplat.core.server.structured import checked
        try:
            return checked({k: v for k, v in dataclasses.asdict(self).items() if v is not None})
        except APIError as e:
            raise ValueError(f"StructuredOutputsParams: {e.message}") from None


@dataclass
class SamplingParams:
    """What vLLM's SamplingParams means by these fields (temperature 0 is greedy; top_k 0 or -1,
    top_p 1 and min_p 0 are off; logprobs: how many alternatives per token; penalties, logit_bias,
    min_tokens, bad_words, allowed_token_ids as the server's request fields)."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    truncate_prompt_tokens: Optional[int] = None
    structured_outputs: Optional[StructuredOutputsParams] = None
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        checks = ((self.n >= 1, "n must be at least 1"), (self.temperature >= 0, "temperature must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"), (self.top_k >= -1, "top_k must be >= -1"),
                  (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                  (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
                  (self.logprobs is None or self.logprobs >= 0, "logprobs must be >= 0"),
                  (self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs must be >= 0"),
                  (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
                  (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (self.min_tokens >= 0, "min_tokens must be >= 0"),
                  (self.max_tokens is None or self.min_tokens <= self.max_tokens,
                   "min_tokens must be less than or equal to max_tokens"),
                  (self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
                   "allowed_token_ids must not be empty"),
                  (self.truncate_prompt_tokens is None or self.truncate_prompt_tokens >= 1,
                   "truncate_prompt_tokens must be >= 1"))
        for ok, why in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {why}")
        self._constraint = self.structured_outputs.engine_constraint() if self.structured_outputs else None

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the fields name must be in the model's vocabulary."""
        for name, ids in (("logit_bias", list(self.logit_bias or {})), ("allowed_token_ids", self.allowed_token_ids),
                          ("stop_token_ids", self.stop_token_ids)):
            if any(not 0 <= t < vocab_size for t in ids or []):
                raise ValueError(f"SamplingParams: {name} has token ids outside the vocabulary (size {vocab_size})")

    def engine_params(self, index: int, room: int, tokenizer=None) -> P.SamplingParams:
        """Sample `index`'s settings; `room` is what the context leaves for output (max_tokens None);
        the tokenizer turns bad_words into token ids."""
        from epplat.core.server.tokenizer import bad_words_token_ids
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        seed = None if self.seed is None else self.seed + index
        return P.SamplingParams(
            max_tokens=min(self.max_tokens or room, room), temperature=self.temperature, top_p=self.top_p,
            top_k=max(self.top_k, 0), min_p=self.min_p, seed=seed, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logit_bias={int(t): min(100.0, max(-100.0, b)) for t, b in (self.logit_bias or {}).items()},
            min_tokens=self.min_tokens,
            bad_words_token_ids=bad_words_token_ids(tokenizer, self.bad_words) if self.bad_words else [],
            allowed_token_ids=self.allowed_token_ids, structured_output=self._constraint)
