"""Decode attention over the paged KV cache as a Triton kernel, split over the KV length
(flash-decoding): each program takes one sequence, one KV head (all its query heads at
once, on tensor cores) and one slice of the sequence's tokens, read in tiles that may span
several pages; a second kernel merges the slices by their log-sum-exp. The grid has room for
a fixed number of slices (from the batch size, so a CUDA graph fits every length); a sequence
uses as many as its length fills with MIN_SPLIT_TOKENS each, the rest return at once, and a
sequence in one slice is written out directly. Reads only the blocks a sequence uses and takes
lengths from a device tensor, so it can be captured in a CUDA graph. Where a counter buffer
is at hand the merge runs inside the split kernel (one launch): the last program of a
(sequence, KV head) to finish, told so by an atomic counter, merges the slices and resets
the counter for the next launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epplat.platforms.cuda import pdl as _pdl
from epplat.platforms.cuda.launch import cached

_TARGET_PROGRAMS = 2 * 132   # about two waves of an H100/H200's SMs
# tokens a slice of a sequence takes at least: at batch 1 and 512 cached tokens, 32 slices of one 16-token
# page each (the launch before this) took 14.2 us on an H200, nearly all of it the last arriver's 32-step merge
MIN_SPLIT_TOKENS = 128
# slices the last arriver loads at once when it merges (one after another, each slice is a dependent L2 round
# trip; at batch 1 on the H200 the attention took 9.2 us with 128-token slices, a chain of such round trips);
# float32 (IEEE dots) one at a time: 4 took it to 255 registers and spills in sm_90 PTX
MERGE_STEP = 4


@triton.jit
def online_softmax_step(scores, v, m, l_sum, acc, IEEE: tl.constexpr):
    """One tile of flash attention's running softmax: scores [G, T] (-inf where masked) against values v
    [T, D]; returns the running max m and sum l_sum [G] and the unnormalised output acc [G, D] after it."""
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    p = tl.exp(scores - m_new[:, None])
    alpha = tl.exp(m - m_new)
    l_sum = l_sum * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_sum, acc


@triton.jit
def softmax_result(m, l_sum, acc):
    """(output [G, D], log-sum-exp [G]) of a slice from its running softmax; zeros and -inf for no tokens."""
    has = l_sum > 0
    return acc / tl.where(has, l_sum, 1.0)[:, None], tl.where(has, m + tl.log(tl.where(has, l_sum, 1.0)), float("-inf"))


@cached
@triton.jit(do_not_specialize=["table_stride"])
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, o_ptr, lse_ptr, scale,
                         table_stride, q_stride, kv_heads: tl.constexpr, group: tl.constexpr,
                         splits: tl.constexpr, GROUP_P: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                         IEEE: tl.constexpr, out_ptr, cnt_ptr, FUSE_MERGE: tl.constexpr, TILE: tl.constexpr,
                         MIN_TILES: tl.constexpr, PDL: tl.constexpr, MERGE: tl.constexpr = 1):
    _pdl.start(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    length = tl.load(lens_ptr + b)
    ntiles = tl.cdiv(length, TILE)
    # the slices this sequence uses: at most ``splits``, each of at least MIN_TILES tiles (a short context is
    # latency-bound: more slices only add merge work); the programs beyond them have nothing to do
    active = tl.maximum(1, tl.minimum(splits, tl.cdiv(ntiles, MIN_TILES)))
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, D)
    gmask = g < group
    heads = kvh * group + g
    row = ((b * kv_heads + kvh) * splits + sp) * GROUP_P + g
    if sp < active:
        per = tl.cdiv(ntiles, active)
        start = sp * per
        end = tl.minimum(start + per, ntiles)
        s = tl.arange(0, TILE)
        q = tl.load(q_ptr + b * q_stride + heads[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)
        m = tl.full([GROUP_P], float("-inf"), tl.float32)
        l_sum = tl.zeros([GROUP_P], tl.float32)
        acc = tl.zeros([GROUP_P, D], tl.float32)
        for n in range(start, end):
            pos = n * TILE + s                   # a tile of TILE tokens spans TILE / BLOCK pages (or part of one)
            inside = pos < length
            block = tl.load(tables_ptr + b * table_stride + pos // BLOCK, mask=inside, other=0).to(tl.int64)
            off = ((block * BLOCK + pos % BLOCK)[:, None] * kv_heads + kvh) * D + d[None, :]
            k = tl.load(k_ptr + off, mask=inside[:, None], other=0.0)
            v = tl.load(v_ptr + off, mask=inside[:, None], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, tl.trans(k)) * scale
            m, l_sum, acc = online_softmax_step(tl.where(inside[None, :], scores, float("-inf")), v, m, l_sum, acc,
                                                IEEE)
        out, lse = softmax_result(m, l_sum, acc)
        if not FUSE_MERGE:
            tl.store(o_ptr + row[:, None] * D + d[None, :], out)
            tl.store(lse_ptr + row, lse)
        elif active == 1:                   # the whole sequence in this program: no slices to merge
            tl.store(out_ptr + (b * kv_heads * group + heads)[:, None] * D + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
        else:
            tl.store(o_ptr + row[:, None] * D + d[None, :], out)
            tl.store(lse_ptr + row, lse)
            tl.debug_barrier()          # every thread's slice stored before the counter's release
            arrived = tl.atomic_add(cnt_ptr + b * kv_heads + kvh, 1)      # acq_rel, gpu scope
            tl.debug_barrier()
            if arrived == active - 1:   # the last slice: merge them all
                first = (b * kv_heads + kvh) * splits * GROUP_P + g
                m = tl.full([GROUP_P], float("-inf"), tl.float32)
                den = tl.zeros([GROUP_P], tl.float32)
                acc = tl.zeros([GROUP_P, D], tl.float32)
                # other programs' slices through L2 (.cg: never a stale L1 line), MERGE at a time so that their
                # loads are in flight together (a slice past ``active`` reads as empty: the same sums)
                for c in range(0, active, MERGE):
                    for j in tl.static_range(MERGE):
                        ok = g * 0 + (c + j) < active     # [GROUP_P]: Triton 3.9's interpreter takes no scalar mask
                        lse_i = tl.load(lse_ptr + first + (c + j) * GROUP_P, mask=ok, other=float("-inf"),
                                        cache_modifier=".cg")
                        o_i = tl.load(o_ptr + (first + (c + j) * GROUP_P)[:, None] * D + d[None, :], mask=ok[:, None],
                                      other=0.0, cache_modifier=".cg")
                        m_new = tl.maximum(m, lse_i)
                        alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
                        beta = tl.where(lse_i == float("-inf"), 0.0, tl.exp(lse_i - m_new))
                        den = den * alpha + beta
                        acc = acc * alpha[:, None] + beta[:, None] * o_i
                        m = m_new
                res = acc / tl.where(den > 0, den, 1.0)[:, None]
                tl.store(out_ptr + (b * kv_heads * group + heads)[:, None] * D + d[None, :],
                         res.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
                tl.atomic_xchg(cnt_ptr + b * kv_heads + kvh, 0)
    else:
        if not FUSE_MERGE:              # an empty slice for the merge kernel
            tl.store(lse_ptr + row, tl.full([GROUP_P], float("-inf"), tl.float32))
            tl.store(o_ptr + row[:, None] * D + d[None, :], tl.zeros([GROUP_P, D], tl.float32))


@cached
@triton.jit
def _merge_kernel(o_ptr, lse_ptr, out_ptr, heads, kv_heads: tl.constexpr, group: tl.constexpr, splits: tl.constexpr,
                  SPLITS_P: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr):
    """out[b, head] = sum over splits of softmax(lse) * o, for one (sequence, query head); out is
    [B, heads, D] (heads may be fewer than kv_heads * group: MLA's last head group can be partial)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh, g = h // group, h % group
    sp = tl.arange(0, SPLITS_P)
    d = tl.arange(0, D)
    rows = ((b * kv_heads + kvh) * splits + sp) * GROUP_P + g
    lse = tl.load(lse_ptr + rows, mask=sp < splits, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, axis=0))
    w = w / tl.sum(w, axis=0)
    o = tl.load(o_ptr + rows[:, None] * D + d[None, :], mask=(sp < splits)[:, None], other=0.0)
    tl.store(out_ptr + (b * heads + h) * D + d, tl.sum(w[:, None] * o, axis=0).to(out_ptr.dtype.element_ty))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                     lens: torch.Tensor, scale: float, *, tile: int = 0, min_tokens: int = MIN_SPLIT_TOKENS,
                     merge: int = 0, pdl: bool = False) -> torch.Tensor:
    """q: [B, H, D]; caches [num_blocks, block_size, KVH, D]; tables [B, W]; lens [B] -> [B, H, D]. Each
    program reads ``tile`` tokens a step (0: 64, 32 for float32 or wide heads) and each slice of a sequence
    at least ``min_tokens`` (benchmarks/decode_kernels.py sweeps both); the merge loads ``merge`` slices at once
    (0: MERGE_STEP, 1 for float32).

    Returns None for shapes the kernel does not take (block size or head dim below 16, or not
    a power of two); the caller then uses its portable path."""
    b, h, d = q.shape
    block, kvh = k_cache.shape[1], k_cache.shape[2]
    if block < 16 or d < 16 or block & (block - 1) or d & (d - 1):
        return None
    group = h // kvh
    gp = max(16, triton.next_power_of_2(group))
    splits = min(32, 1 << ((-(-_TARGET_PROGRAMS // (b * kvh))).bit_length() - 1))   # powers of two: 6 variants
    tile = tile or max(16, min(64 if q.dtype != torch.float32 and d <= 128 else 32, 8192 // d))
    mid = torch.empty((b, kvh, splits, gp, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, kvh, splits, gp), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    cnt = counters(q.device, b * kvh)
    _decode_split_kernel[(b, kvh, splits)](q.contiguous(), k_cache, v_cache, tables, lens, mid, lse, scale,
                                           tables.stride(0), h * d, kvh, group, splits, gp, block, d,
                                           q.dtype == torch.float32, out, mid if cnt is None else cnt,
                                           cnt is not None, tile, min_tokens // tile or 1, pdl and cnt is not None,
                                           merge or (1 if q.dtype == torch.float32 else MERGE_STEP),
                                           launch_pdl=pdl and cnt is not None)
    if cnt is None:
        _merge_kernel[(b, h)](mid, lse, out, h, kvh, group, splits, triton.next_power_of_2(splits), gp, d)
    return out


_COUNTERS = 1 << 16        # (sequence, KV head) pairs one launch can count; more take the two-launch path
_counters: dict = {}


def counters(device: torch.device, n: int):
    """A zeroed int32 buffer of at least n counters on device, kept zero between launches by the kernels
    that use it (each program that reads its count as the last resets it); None above _COUNTERS, or while
    a CUDA graph is being captured before the buffer exists (an allocation there would live in the graph's
    pool)."""
    buf = _counters.get(device)
    if buf is None:
        if n > _COUNTERS or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return None
        buf = _counters[device] = torch.zeros(_COUNTERS, dtype=torch.int32, device=device)
    return buf if n <= buf.numel() else None


@cached
@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, ROW: tl.constexpr, ROW_P: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    i = tl.arange(0, ROW_P)
    m = i < ROW
    tl.store(kc_ptr + slot * ROW + i, tl.load(k_ptr + t.to(tl.int64) * ROW + i, mask=m), mask=m)
    tl.store(vc_ptr + slot * ROW + i, tl.load(v_ptr + t.to(tl.int64) * ROW + i, mask=m), mask=m)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> bool:
    """The step's new keys and values [T, KVH, D] into their cache slots, both in one launch (the
    torch path is two index_copy_ kernels). False for layouts it does not take."""
    if not (k.is_contiguous() and v.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
            and k.dtype == k_cache.dtype and v.dtype == v_cache.dtype):
        return False
    t, row = k.shape[0], k.shape[1] * k.shape[2]
    if t:
        _kv_write_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, row, triton.next_power_of_2(row), num_warps=4)
    return True
