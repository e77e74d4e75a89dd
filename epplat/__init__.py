"""epplat: a device-agnostic expert-parallel serving engine for MoE models.

``from epplat import LLM, SamplingParams`` is vLLM's offline API (epplat/offline/), imported on first use."""

__version__ = "0.1.0"

_OFFLINE = {"LLM": "epplat.offline.llm", "SamplingParams": "epplat.offline.sampling_params",
            "StructuredOutputsParams": "epplat.offline.sampling_params",
            "RequestOutput": "epplat.offline.outputs", "CompletionOutput": "epplat.offline.outputs"}


def __getattr__(name: str):
    if name in _OFFLINE:
        import importlib
        return getattr(importlib.import_module(_OFFLINE[name]), name)
    raise AttributeError(f"module 'epplat' has no attribute {name!r}")
