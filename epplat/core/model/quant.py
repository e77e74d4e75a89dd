"""The quantization interface (``--quantization NAME``, the ``quantization`` hook).

A :class:`QuantMethod` is made per engine process from the engine config and the
architecture's checkpoint-name mapping (and once in ``epplat serve``, whose constructor
call checks the checkpoint before any engine starts). It takes part in building the model in four
steps, all optional:

    quant.process_model(model)           # after construction: swap parameters (int8, fp8, scales)
    quant.owns(name) / quant.load_weight(model, name, tensor)   # checkpoint tensors it reads itself
    quant.required_names(model)          # extra tensors the checkpoint must have (scales)
    quant.after_loading(model)           # repack for the kernels, check

and runs the GEMMs of the layers it swapped (e.g. a MoE layer's ``experts`` function).
Raises ConfigError (one line) for checkpoints it cannot serve.
"""

from __future__ import annotations

from typing import Callable, Optional


class QuantMethod:
    name = "none"

    def __init__(self, cfg, canonical_name: Callable[[str], str]):
        self.cfg, self.canonical_name = cfg, canonical_name

    def process_model(self, model) -> None:
        """Replace the parameters of the layers this scheme quantizes (before loading)."""

    def owns(self, name: str) -> bool:
        """Whether the checkpoint tensor with canonical name `name` is read by load_weight."""
        return False

    def load_weight(self, model, name: str, tensor) -> bool:
        """Load one owned tensor; False when this rank keeps none of it."""
        raise KeyError(name)

    def required_names(self, model) -> set[str]:
        """Canonical names of the owned tensors this rank must find in the checkpoint."""
        return set()

    def after_loading(self, model) -> None:
        """Called once every tensor is loaded."""


def load_quant_method(cfg, canonical_name, platform: str) -> Optional[QuantMethod]:
    """The configured method (``cfg.model.quantization``), or None for unquantized checkpoints."""
    if not cfg.model.quantization:
        return None
    from epplat.plugins import registry
    return registry().load("quantization", cfg.model.quantization, platform)(cfg, canonical_name)
