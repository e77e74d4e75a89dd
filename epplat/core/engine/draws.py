"""How a request's tokens are drawn, fixed by its sampling settings: classified once, when the engine
takes the request, so that a step's sampler reads one attribute a row instead of testing four settings
(at batch 256 those tests cost more host time than the draw kernel's launch)."""

from __future__ import annotations

GREEDY = 0      # temperature 0: the argmax
SOFTMAX = 1     # from softmax(logits / temperature) alone (Kernels.sample where the platform has it)
FILTERED = 2    # top-k, top-p or min-p first (a top_k of the vocabulary or more narrows nothing: the sampler
                # takes such rows as SOFTMAX, see sampler.sample_tokens)


def draw_kind(p) -> int:
    """The draw of a request with SamplingParams p."""
    if p.temperature <= 1e-5:
        return GREEDY
    return FILTERED if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0 else SOFTMAX
