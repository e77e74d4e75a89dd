"""Programmatic dependent launch (Hopper and later) for the Triton kernels of a decode layer.

At batch 1 a layer is ~12 kernels of a few microseconds each, and the gap between two of them (the next
grid's launch waiting for the last block of the one before and its memory flush) is ~20 us of a layer's
~83 us on an H200. Launched with ``launch_pdl`` a kernel's grid may start while the kernel before it in the
stream finishes; each such kernel begins with ``start(PDL)``: ``griddepcontrol.wait`` (nothing of the kernel
before is read until that kernel is complete and flushed, so results are those of serial launches) and then
``griddepcontrol.launch_dependents`` (the kernel after may be placed on the SMs now). Off by default
(ENABLED) until measured: ``benchmarks/decode_roofline.py --compare-pdl`` times the step both ways.
A kernel whose first input is a weight (the GEMV) asks for it in L2 before its wait (``prefetch_l2``): placed
while the kernel before still runs (at batch 1 the attention, 9 us of latency over 1 MB), the o_proj GEMV's
17 MB can be in L2 (50 MB on an H200) when it starts.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

ENABLED = False


@functools.lru_cache(maxsize=None)
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def on(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch as dependents (ENABLED, a CUDA device of compute capability 9+)."""
    return ENABLED and device.type == "cuda" and _hopper(device.index if device.index is not None else 0)


@triton.jit
def prefetch_l2(ptrs):
    """Ask for the 128-byte lines at ``ptrs`` (valid addresses) in L2, kept there (evict_last), without waiting
    for them: what a dependent kernel can do with its weights, written by no kernel, before its wait."""
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def start(PDL: tl.constexpr):
    """The first statement of a kernel that may be launched with ``launch_pdl``."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
