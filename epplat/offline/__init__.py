"""vLLM's offline Python API (``from epplat import LLM, SamplingParams``) over epplat's engines."""
