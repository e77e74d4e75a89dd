"""Kernels.sample on cuda: one token a row drawn from softmax(logits / T) in one launch over the row.

An exponential race: the token is argmax_j(x_j / T - ln E_j) with E_j ~ Exp(1) (the Gumbel-max
trick in the form argmax p_j / E_j), E_j from Triton's Philox (``tl.randint4x``) keyed by the row's
64-bit key, counter (j / 1024) * 256 + j % 256 for token j, output (j % 1024) / 256: noise made in
registers, no [B, V] random tensor. E = -ln(1 - v) of a uniform v, by its series below v = 1/64,
where 1 - v would round away the small v (the race's winners). The score is kept in base 2
(log2(e) (x / T - ln E) less a constant: the same argmax), its two logarithms by the GPU's
``lg2.approx`` (one instruction each; the interpreter takes numpy's log2).

One launch does everything: a row's vocabulary tiles are split over a few programs (enough programs
to fill the GPU: 149 for one 151,936-token row, one per row from ~1,000 rows), each keeps a best
(score, token) per lane over its tiles and folds the lanes' best into the row's answer with one 64-bit
atomic max (the score's bits, ordered as integers, above the token id) in a scratch word of the row;
the last program of a row to finish (a per-row counter) writes the token and resets the scratch, so
no fill before and no mask after. The scratch is per device, for launches on one stream (the
engine's). The CPU kernel (sample_race in epplat/platforms/cpu/kernels.c) makes the same noise, so a
key draws the same tokens on both platforms but for rounding.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from epplat.platforms.cuda.launch import cached

BLOCK = 1024        # tokens of one tile (the noise's block: kernels.c's RACE_BLOCK)
PROGRAMS_PER_SM = 8
WARPS = 8           # H200 sweep (sampler_bench.py --sweep): batch 256 0.069 ms against 4 warps' 0.082
INTERPRETER_PROGRAMS = 8     # on the CPU (Triton's interpreter): few, so tests meet split rows
_MIN64 = -(1 << 63)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    if FAST:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        y = tl.log2(x)
    return y


@triton.jit
def _keep(row_ptr, tok, vocab, c, r, best, at, FAST: tl.constexpr):
    """Fold one quarter of a tile (tokens tok, Philox output r) into the lanes' best (score, token)."""
    x = tl.load(row_ptr + tok, mask=tok < vocab, other=-float("inf")).to(tl.float32)
    v = (r.to(tl.uint32, bitcast=True) >> 1).to(tl.int32).to(tl.float32) * 4.656612873077393e-10 + 2.3283064365386963e-10
    v = tl.minimum(v, 0.99999994)
    # E / ln 2 = -log2(1 - v)
    e2 = tl.where(v < 0.015625, v * (1.0 + v * (0.5 + v * 0.3333333333333333)) * 1.4426950408889634,
                  -_log2(1.0 - v, FAST))
    s = x * c - _log2(e2, FAST)
    better = s > best
    return tl.where(better, s, best), tl.where(better, tok, at)


@cached
@triton.jit(do_not_specialize=["rows", "key_lo", "key_hi", "tiles_per_prog", "splits"])
def _race_kernel(x_ptr, stride, vocab, rows, out_ptr, acc_ptr, cnt_ptr, key_lo, key_hi, inv_t, vals_ptr,
                 tiles_per_prog, splits, PER_ROW: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)             # rows on grid axis 0 (CUDA caps axes 1 and 2 at 65,535)
    split = tl.program_id(1)           # this program's share of the row's tiles
    if PER_ROW:                        # vals: the rows' keys, then the bits of their 1 / T
        key = tl.load(vals_ptr + row)
        it = tl.load(vals_ptr + rows + row).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        key = key_hi.to(tl.int64) * 2147483648 + key_lo + row
        it = inv_t
    c = it * 1.4426950408889634
    Q: tl.constexpr = BLOCK // 4
    i = tl.arange(0, Q)
    row_ptr = x_ptr + row.to(tl.int64) * stride
    best = tl.full([Q], -float("inf"), tl.float32)
    at = tl.zeros([Q], tl.int32)
    first = split * tiles_per_prog
    last = tl.minimum(first + tiles_per_prog, tl.cdiv(vocab, BLOCK))
    for tile in range(first, last):
        r0, r1, r2, r3 = tl.randint4x(key, tile * Q + i)
        start = tile * BLOCK + i
        best, at = _keep(row_ptr, start, vocab, c, r0, best, at, FAST)
        best, at = _keep(row_ptr, start + Q, vocab, c, r1, best, at, FAST)
        best, at = _keep(row_ptr, start + 2 * Q, vocab, c, r2, best, at, FAST)
        best, at = _keep(row_ptr, start + 3 * Q, vocab, c, r3, best, at, FAST)
    bits = best.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)          # float order as signed integers
    packed = tl.max((ordered.to(tl.int64) << 32) | at.to(tl.int64), axis=0)
    if splits == 1:
        tl.store(out_ptr + row, packed & 0x7FFFFFFF)
    else:
        tl.atomic_max(acc_ptr + row, packed)
        if tl.atomic_add(cnt_ptr + row, 1) == splits - 1:      # the row's last program
            tl.store(out_ptr + row, tl.atomic_xchg(acc_ptr + row, -9223372036854775808) & 0x7FFFFFFF)
            tl.store(cnt_ptr + row, 0)


_scratch: dict = {}


def _row_scratch(dev: torch.device, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row atomic max word (kept at its minimum between launches) and counter (kept at 0)."""
    acc, cnt = _scratch.get(dev, (None, None))
    if acc is None or acc.numel() < b:
        n = max(b, 256, 2 * (0 if acc is None else acc.numel()))
        acc, cnt = torch.full((n,), _MIN64, dtype=torch.int64, device=dev), torch.zeros(n, dtype=torch.int32, device=dev)
        _scratch[dev] = acc, cnt
    return acc, cnt


@functools.lru_cache(maxsize=None)
def _programs(dev: torch.device) -> int:
    if dev.type != "cuda":
        return INTERPRETER_PROGRAMS
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(dev).multi_processor_count


@functools.lru_cache(maxsize=1024)
def _split(dev: torch.device, b: int, vocab: int) -> tuple[int, int]:
    """(tiles a program folds, programs a row) for b rows of vocab tokens."""
    tiles = triton.cdiv(vocab, BLOCK)
    tiles_per_prog = triton.cdiv(tiles, max(1, min(tiles, triton.cdiv(_programs(dev), b))))
    return tiles_per_prog, triton.cdiv(tiles, tiles_per_prog)


def sample(logits: torch.Tensor, temperature, keys) -> Optional[torch.Tensor]:
    """Kernels.sample: tokens [B] int64 of float32 / bfloat16 / float16 logits [B, V]; temperature and keys
    are numbers for every row (row i's key: keys + i) or [B] host tensors (one packed copy to the device)."""
    if (logits.dtype not in (torch.float32, torch.bfloat16, torch.float16) or logits.dim() != 2
            or logits.stride(-1) != 1):
        return None
    b, vocab = logits.shape
    dev = logits.device
    tiles_per_prog, splits = _split(dev, b, vocab)
    out = torch.empty(b, dtype=torch.int64, device=dev)
    acc, cnt = _row_scratch(dev, b)
    fast = dev.type == "cuda"
    if isinstance(temperature, torch.Tensor) or isinstance(keys, torch.Tensor):
        k = keys.to("cpu", torch.int64) if isinstance(keys, torch.Tensor) else torch.arange(keys, keys + b)
        t = temperature.to("cpu", torch.float32) if isinstance(temperature, torch.Tensor) else torch.full((b,), temperature)
        host = torch.cat([k, (1.0 / t).view(torch.int32).to(torch.int64)])
        vals = host.pin_memory().to(dev, non_blocking=True) if fast else host
        _race_kernel[(b, splits)](logits, logits.stride(0), vocab, b, out, acc, cnt, 0, 0, 1.0, vals, tiles_per_prog,
                                  splits, True, fast, BLOCK, num_warps=WARPS)
    else:
        _race_kernel[(b, splits)](logits, logits.stride(0), vocab, b, out, acc, cnt, keys & 0x7FFFFFFF, keys >> 31,
                                  1.0 / temperature, out, tiles_per_prog, splits, False, fast, BLOCK, num_warps=WARPS)
    return out
