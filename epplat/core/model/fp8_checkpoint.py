"""The checkpoint side of ``--quantization fp8``: which tensors of a DeepSeek-V3-layout fp8 checkpoint
are fp8, and each fp8 weight handed to the platform's method together with its ``weight_scale_inv``.

The platforms decide what an fp8 weight becomes (cuda: an fp8 GEMM operand; cpu: dequantized at
load). This base reads ``quantization_config``, owns every fp8 weight and scale the checkpoint has,
pairs them whatever their order in the shards, and asks for the scale of every fp8 weight this rank
keeps.
"""

from __future__ import annotations

import torch

from epplat.config import ConfigError
from epplat.core.model.fp8_blocks import SCALE_SUFFIX, block_size, scaled_tensors
from epplat.core.model.quant import QuantMethod


class Fp8Checkpoint(QuantMethod):
    name = "fp8"

    def __init__(self, cfg, canonical_name):
        super().__init__(cfg, canonical_name)
        qc = cfg.model.hf_config().get("quantization_config")
        self.block = None
        self.scale_of: dict[str, str] = {}      # canonical fp8 weight name -> canonical scale name
        self.shape_of: dict[str, list] = {}     # canonical fp8 weight name -> its shape in the checkpoint
        if qc:
            try:
                self.block = block_size(qc)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            for w, shape in scaled_tensors(cfg.model.model).items():
                self.scale_of[canonical_name(w)] = canonical_name(w + "_scale_inv")
                self.shape_of[canonical_name(w)] = shape
            if not self.scale_of:
                raise ConfigError(f"--quantization fp8: quantization_config says fp8 but the checkpoint has no "
                                  f"*{SCALE_SUFFIX} tensors")
        self.weight_of = {s: w for w, s in self.scale_of.items()}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def from_fp8(self) -> bool:
        return self.block is not None

    def owns(self, name: str) -> bool:
        return name in self.scale_of or name in self.weight_of

    def load_weight(self, model, name: str, tensor: torch.Tensor) -> bool:
        weight = self.weight_of.get(name, name)
        if not model.wants(weight):
            return False
        if name == weight and tensor.dtype != torch.float8_e4m3fn:
            raise ValueError(f"quantization_config says fp8 but the tensor is {tensor.dtype}")
        pair = self._pending.setdefault(weight, {})
        pair["scale" if name != weight else "weight"] = tensor
        if len(pair) < 2:
            return True
        del self._pending[weight]
        return self.load_pair(model, weight, pair["weight"], pair["scale"])

    def load_pair(self, model, name: str, weight: torch.Tensor, scale: torch.Tensor) -> bool:
        """Load the fp8 weight with canonical name `name` [out, in] and its scale_inv; False when this
        rank keeps none of it."""
        raise NotImplementedError

    def required_names(self, model) -> set[str]:
        return {s for w, s in self.scale_of.items() if model.wants(w)}

    def after_loading(self, model) -> None:
        if self._pending:
            raise ValueError(f"fp8 weight {sorted(self._pending)[0]} came without its weight or weight_scale_inv")
