"""Kernels.sample on cuda: one token a row drawn from softmax(logits / T) in one pass over the row.

An exponential race: the token is argmax_j(x_j / T - ln E_j) with E_j ~ Exp(1) (the Gumbel-max
trick in the form argmax p_j / E_j), E_j from Triton's Philox (``tl.randint4x``) keyed by the row's
64-bit key, counter (j / 1024) * 256 + j % 256 for token j, output (j % 1024) / 256: noise made in
registers, no [B, V] random tensor. The
vocabulary is split over programs (149 of them for a 151,936-token row, to fill the GPU at batch
1); each folds its best (score, token) into the row's answer with one 64-bit atomic max (the
score's bits, ordered as integers, above the token id), so one launch does the reduction too.
E = -ln(1 - v) of a uniform v, by its series below v = 1/64, where 1 - v would round away the
small v (the race's winners). The CPU kernel (sample_race in epplat/platforms/cpu/kernels.c) makes
the same noise, so a key draws the same tokens on both platforms but for rounding.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK = 1024        # tokens a program scores (the noise's block: kernels.c's RACE_BLOCK)


@triton.jit
def _best(row_ptr, tok, vocab, inv_t, r):
    """The best (score, token) of one quarter of a block."""
    x = tl.load(row_ptr + tok, mask=tok < vocab, other=-float("inf")).to(tl.float32)
    v = (r.to(tl.uint32, bitcast=True) >> 1).to(tl.int32).to(tl.float32) * 4.656612873077393e-10 + 2.3283064365386963e-10
    v = tl.minimum(v, 0.99999994)
    e = tl.where(v < 0.015625, v * (1.0 + v * (0.5 + v * 0.3333333333333333)), -tl.log(1.0 - v))
    s = x * inv_t - tl.log(e)
    return tl.max(s, axis=0, return_indices=True)


@triton.jit(do_not_specialize=["key_lo", "key_hi"])
def _race_kernel(x_ptr, stride, vocab, out_ptr, key_lo, key_hi, inv_t, keys_ptr, inv_t_ptr,
                 PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    tile = tl.program_id(1)            # vocabulary tiles: 149 for 151,936 tokens
    row = tl.program_id(0)             # rows on grid axis 0 (CUDA caps axes 1 and 2 at 65,535)
    if PER_ROW:
        key = tl.load(keys_ptr + row)
        it = tl.load(inv_t_ptr + row)
    else:
        key = key_hi.to(tl.int64) * 2147483648 + key_lo + row
        it = inv_t
    Q: tl.constexpr = BLOCK // 4
    i = tl.arange(0, Q)
    r0, r1, r2, r3 = tl.randint4x(key, tile * Q + i)
    row_ptr = x_ptr + row.to(tl.int64) * stride
    start = tile * BLOCK
    best, at = _best(row_ptr, start + i, vocab, it, r0)
    arg = start + at
    s1, a1 = _best(row_ptr, start + Q + i, vocab, it, r1)
    arg = tl.where(s1 > best, start + Q + a1, arg)
    best = tl.maximum(best, s1)
    s2, a2 = _best(row_ptr, start + 2 * Q + i, vocab, it, r2)
    arg = tl.where(s2 > best, start + 2 * Q + a2, arg)
    best = tl.maximum(best, s2)
    s3, a3 = _best(row_ptr, start + 3 * Q + i, vocab, it, r3)
    arg = tl.where(s3 > best, start + 3 * Q + a3, arg)
    best = tl.maximum(best, s3)
    bits = best.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)          # float order as signed integers
    tl.atomic_max(out_ptr + row, (ordered.to(tl.int64) << 32) | arg.to(tl.int64))


def sample(logits: torch.Tensor, temperature, keys) -> Optional[torch.Tensor]:
    """Kernels.sample: tokens [B] int64 of float32 logits [B, V]; temperature and keys are numbers
    for every row (row i's key: keys + i) or [B] tensors on the logits' device."""
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(-1) != 1:
        return None
    b, vocab = logits.shape
    dev = logits.device
    out = torch.full((b,), -(1 << 63), dtype=torch.int64, device=dev)
    per_row = isinstance(temperature, torch.Tensor) or isinstance(keys, torch.Tensor)
    if per_row:
        inv_t = (1.0 / temperature if isinstance(temperature, torch.Tensor)
                 else torch.full((b,), 1.0 / temperature, device=dev)).to(torch.float32)
        keys_t = keys.to(torch.int64) if isinstance(keys, torch.Tensor) else torch.arange(keys, keys + b, device=dev)
        _race_kernel[(b, triton.cdiv(vocab, BLOCK))](logits, logits.stride(0), vocab, out, 0, 0, 1.0, keys_t, inv_t,
                                                     PER_ROW=True, BLOCK=BLOCK)
    else:
        _race_kernel[(b, triton.cdiv(vocab, BLOCK))](logits, logits.stride(0), vocab, out, keys & 0x7FFFFFFF,
                                                     keys >> 31, 1.0 / temperature, out, logits,
                                                     PER_ROW=False, BLOCK=BLOCK)
    return out.bitwise_and_(0xFFFFFFFF)
