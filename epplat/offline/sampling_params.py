"""vLLM's user-facing SamplingParams for the offline API: its names and defaults, turned into the
engine's per-request settings (one per sample when n > 1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from epplat.core.engine import protocol as P


@dataclass
class SamplingParams:
    """What vLLM's SamplingParams means by these fields (temperature 0 is greedy; top_k 0 or -1,
    top_p 1 and min_p 0 are off; logprobs: how many alternatives per token)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        checks = ((self.n >= 1, "n must be at least 1"), (self.temperature >= 0, "temperature must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"), (self.top_k >= -1, "top_k must be >= -1"),
                  (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                  (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
                  (self.logprobs is None or self.logprobs >= 0, "logprobs must be >= 0"))
        for ok, why in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {why}")

    def engine_params(self, index: int, room: int) -> P.SamplingParams:
        """Sample `index`'s settings; `room` is what the context leaves for output (max_tokens None)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        seed = None if self.seed is None else self.seed + index
        return P.SamplingParams(
            max_tokens=min(self.max_tokens or room, room), temperature=self.temperature, top_p=self.top_p,
            top_k=max(self.top_k, 0), min_p=self.min_p, seed=seed, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, logprobs=self.logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens)
