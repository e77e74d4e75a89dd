"""``--quantization fp8`` on cpu: a DeepSeek-V3-layout fp8 checkpoint dequantized at load.

The cpu platform has no fp8 GEMM, so every fp8 weight is multiplied out with its 128x128 block
scales (float32, rounded once to the model dtype) as it is read, and the model runs in --dtype;
the startup log says so in one line. This is what lets the cpu oracle tests serve the same fp8
checkpoint the cuda platform runs in fp8.
"""

from __future__ import annotations

import logging

from epplat.config import ConfigError
from epplat.core.model.fp8_blocks import dequantize_blocks
from epplat.core.model.fp8_checkpoint import Fp8Checkpoint

logger = logging.getLogger(__name__)


class Fp8Dequantize(Fp8Checkpoint):
    def __init__(self, cfg, canonical_name):
        super().__init__(cfg, canonical_name)
        if not self.from_fp8:
            raise ConfigError("--quantization fp8 on cpu serves fp8 checkpoints (DeepSeek-V3's layout), dequantized "
                              "at load; quantizing an unquantized checkpoint at load needs the cuda platform")
        self.count = 0

    def load_pair(self, model, name, weight, scale) -> bool:
        self.count += 1
        return model.load_weight(name, dequantize_blocks(weight, scale, self.block, model.embed_tokens.dtype))

    def after_loading(self, model) -> None:
        super().after_loading(model)
        logger.info("--quantization fp8 on cpu: the checkpoint's %d fp8 weights (%dx%d block scales) are dequantized "
                    "to %s at load; cpu has no fp8 GEMM", self.count, self.block, self.block,
                    str(model.embed_tokens.dtype).removeprefix("torch."))
