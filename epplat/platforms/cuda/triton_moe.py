"""Fused MoE for decode-sized batches as Triton kernels, and fused top-k routing.

Masked low-latency layout: one program per (local expert, output tile). Each program
finds the assignments routed to its expert by scanning the batch's top-k ids on the
device (no sort, no host sync, no permuted copy of the tokens), gathers those token
rows, and streams only its tile of that expert's weights; experts nobody routed to
cost a few id loads and read no weights. Three launches:

1. ``_gate_up_kernel``: h[a] = act(x[t] @ W1[e]) * (x[t] @ W3[e]) for assignment a = t*K + k;
2. ``_down_kernel``:    y[a] = weight[a] * (h[a] @ W2[e]);
3. ``_sum_kernel``:     out[t] = sum_k y[t*K + k] over the assignments of experts held here.

Rows stay in assignment order, so there is no unpermute. Every program rescans the
ids, which is cheap at decode sizes and wasteful at prefill sizes: large batches go to
``triton_moe_sorted``, see ``MAX_ASSIGNMENTS``.

fp8 weights (``--quantization fp8``: float8_e4m3 with one float32 scale per 128x128 block, see
fp8_moe) go through the same kernels (``W8``): each weight tile is loaded as fp8 (half the
bytes), multiplied by its block's scales in registers and rounded to the activations' dtype,
exactly what dequantize-to-bf16 would give, then multiplied on the tensor cores against the
unquantized activations. At decode sizes the GEMMs are bound by the weight bytes, so the fp8
bytes are the saving and activation quantization would only add work and rounding.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from epplat.platforms.cuda import pdl as _pdl
from epplat.platforms.cuda.launch import cached

# above this many (token, expert) assignments the rescans cost more than they save: on an H100,
# Triton took 0.44 ms against grouped GEMM's 0.56 at 512 assignments, 0.67 against 0.62 at 2048
# (benchmarks/moe_layer_bench.py)
MAX_ASSIGNMENTS = 1024
_ACTS = {"silu": 0, "gelu": 1}
_SCAN = 256   # ids scanned per step when gathering an expert's rows


@triton.jit
def _routed_rows(ids_ptr, e, target, num_assign, SCAN: tl.constexpr):
    """Assignment indices of the rows numbered ``target`` (a [BM] vector) among those routed to
    expert ``e``, in assignment order; 0 where fewer rows exist."""
    rows = tl.zeros_like(target)
    base = 0
    for s in range(0, num_assign, SCAN):
        a = s + tl.arange(0, SCAN)
        mine = (tl.load(ids_ptr + a, mask=a < num_assign, other=-1) == e).to(tl.int32)
        pos = base + tl.cumsum(mine, axis=0) - 1
        hit = (mine[None, :] == 1) & (pos[None, :] == target[:, None])
        rows += tl.sum(tl.where(hit, a[None, :], 0), axis=1)
        base += tl.sum(mine, axis=0)
    return rows


@triton.jit
def _count(ids_ptr, e, num_assign, SCAN: tl.constexpr):
    n = 0
    for s in range(0, num_assign, SCAN):
        a = s + tl.arange(0, SCAN)
        n += tl.sum((tl.load(ids_ptr + a, mask=a < num_assign, other=-1) == e).to(tl.int32), axis=0)
    return n


@triton.jit
def _my_expert(ids_ptr, num_assign, BY_SLOT: tl.constexpr, SCAN: tl.constexpr):
    """(expert, rows routed to it) of this program. By expert: program i takes expert i. By slot
    (fewer assignments than experts): program i takes the expert of assignment i unless an
    earlier assignment has it too, so no program is spent on an expert nobody chose."""
    pid = tl.program_id(0)
    if BY_SLOT:
        e = tl.load(ids_ptr + pid).to(tl.int32)
        earlier = 0
        for s in range(0, pid, SCAN):
            a = s + tl.arange(0, SCAN)
            earlier += tl.sum(((tl.load(ids_ptr + a, mask=a < pid, other=-1) == e) & (a < pid)).to(tl.int32), axis=0)
        count = tl.where((earlier == 0) & (e >= 0), _count(ids_ptr, e, num_assign, SCAN), 0)
    else:
        e = pid
        count = _count(ids_ptr, e, num_assign, SCAN)
    return e, count


@triton.jit
def _dequant(w, s_base, kb, cols, nblocks, cmask, dtype, W8: tl.constexpr):
    """A [BK, BN] weight tile in ``dtype``: fp8 ones (W8) times their 128x128 blocks' scales (block row
    kb: the tile lies within one, BK <= 128), the product in float32 rounded once; others as loaded."""
    if W8:
        sc = tl.load(s_base + kb * nblocks + cols // 128, mask=cmask, other=0.0)
        w = (w.to(tl.float32) * sc[None, :]).to(dtype)
    return w


@triton.jit
def _gated_tile(x_ptr, tok, valid, w_base, n, nmask, hidden, inter, ACT: tl.constexpr, IEEE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, s_base, W8: tl.constexpr):
    """act(x[tok] @ W1[:, n]) * (x[tok] @ W3[:, n]) for one [BM, BN] tile, in float32; W13's rows
    are [gate | up] of width 2 * inter starting at w_base; rows not ``valid`` read zeros. W8: fp8
    weights with block scales at s_base ([hidden / 128, 2 * inter / 128])."""
    acc_g = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, hidden, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < hidden
        xa = tl.load(x_ptr + tok[:, None] * hidden + kk[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        wp = w_base + kk[:, None].to(tl.int64) * (2 * inter) + n[None, :]
        wmask = kmask[:, None] & nmask[None, :]
        wg = _dequant(tl.load(wp, mask=wmask, other=0.0), s_base, k0 // 128, n, 2 * inter // 128, nmask, xa.dtype, W8)
        wu = _dequant(tl.load(wp + inter, mask=wmask, other=0.0), s_base, k0 // 128, inter + n, 2 * inter // 128,
                      nmask, xa.dtype, W8)
        if IEEE:
            acc_g = tl.dot(xa, wg, acc_g, input_precision="ieee")
            acc_u = tl.dot(xa, wu, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(xa, wg, acc_g)
            acc_u = tl.dot(xa, wu, acc_u)
    if ACT == 0:
        g = acc_g * tl.sigmoid(acc_g)
    else:
        g = 0.5 * acc_g * (1.0 + tl.erf(acc_g * 0.7071067811865476))
    return g * acc_u


@cached
@triton.jit(do_not_specialize=["num_assign"])
def _gate_up_kernel(x_ptr, ids_ptr, w_ptr, s_ptr, h_ptr, num_assign, hidden, inter, stride_we, stride_se,
                    K: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, BY_SLOT: tl.constexpr, SCAN: tl.constexpr, W8: tl.constexpr,
                    PDL: tl.constexpr = False):
    _pdl.start(PDL)
    e, count = _my_expert(ids_ptr, num_assign, BY_SLOT, SCAN)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < inter
    w_base = w_ptr + e.to(tl.int64) * stride_we
    for c in range(0, tl.cdiv(count, BM)):
        m = c * BM + tl.arange(0, BM)
        valid = m < count
        rows = _routed_rows(ids_ptr, e, m, num_assign, SCAN)
        tok = (rows // K).to(tl.int64)
        h = _gated_tile(x_ptr, tok, valid, w_base, n, nmask, hidden, inter, ACT, IEEE, BM, BN, BK,
                        s_ptr + e.to(tl.int64) * stride_se, W8)
        tl.store(h_ptr + rows[:, None].to(tl.int64) * inter + n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=valid[:, None] & nmask[None, :])


@cached
@triton.jit(do_not_specialize=["num_assign"])
def _down_kernel(h_ptr, ids_ptr, tw_ptr, w_ptr, s_ptr, y_ptr, num_assign, hidden, inter, stride_we, stride_se,
                 IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BY_SLOT: tl.constexpr,
                 SCAN: tl.constexpr, W8: tl.constexpr, PDL: tl.constexpr = False):
    _pdl.start(PDL)
    e, count = _my_expert(ids_ptr, num_assign, BY_SLOT, SCAN)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < hidden
    w_base = w_ptr + e.to(tl.int64) * stride_we
    s_base = s_ptr + e.to(tl.int64) * stride_se
    for c in range(0, tl.cdiv(count, BM)):
        m = c * BM + tl.arange(0, BM)
        valid = m < count
        rows = _routed_rows(ids_ptr, e, m, num_assign, SCAN).to(tl.int64)
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, inter, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < inter
            ha = tl.load(h_ptr + rows[:, None] * inter + kk[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_base + kk[:, None].to(tl.int64) * hidden + n[None, :], mask=kmask[:, None] & nmask[None, :],
                        other=0.0)
            w = _dequant(w, s_base, k0 // 128, n, hidden // 128, nmask, ha.dtype, W8)
            if IEEE:
                acc = tl.dot(ha, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(ha, w, acc)
        tw = tl.load(tw_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * hidden + n[None, :], (acc * tw[:, None]).to(y_ptr.dtype.element_ty),
                 mask=valid[:, None] & nmask[None, :])


@cached
@triton.jit
def _sum_kernel(y_ptr, ids_ptr, out_ptr, res_ptr, hidden, K: tl.constexpr, BH: tl.constexpr, RES: tl.constexpr,
                PDL: tl.constexpr = False):
    _pdl.start(PDL)
    t = tl.program_id(0)
    d = tl.program_id(1) * BH + tl.arange(0, BH)
    dmask = d < hidden
    acc = tl.zeros([BH], tl.float32)
    for k in tl.static_range(K):
        width = tl.where(tl.load(ids_ptr + t * K + k) >= 0, hidden, 0)    # an unplaced pair (id -1) adds nothing
        acc += tl.load(y_ptr + (t * K + k).to(tl.int64) * hidden + d, mask=d < width, other=0.0).to(tl.float32)
    if RES:     # the layer's residual add, rounded after the sum's own rounding as the torch add would
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32) + tl.load(
            res_ptr + t.to(tl.int64) * hidden + d, mask=dmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * hidden + d, acc.to(out_ptr.dtype.element_ty), mask=dmask)


class Tiles(NamedTuple):
    bm: int = 16         # rows of one chunk of an expert's tokens
    bn1: int = 64        # gate/up columns per program (each of gate and up)
    bk1: int = 128       # hidden (reduction) step of the gate/up GEMM
    bn2: int = 64        # output columns per program of the down GEMM
    bk2: int = 128       # expert-width (reduction) step of the down GEMM
    stages: int = 4
    warps: int = 4

    @classmethod
    def parse(cls, text: str) -> "Tiles":
        return cls(*(int(v) for v in text.split("-")))

    def __str__(self):
        return "-".join(str(v) for v in self)


def _tiles(num_assign: int, experts: int, dtype, w8: bool = False) -> Tiles:
    """Rows per chunk from the expected rows per expert; float32 tiles are twice the bytes, so
    they take a shorter reduction step and fewer stages to fit shared memory; fp8 weight tiles
    are half the bytes, so they take a reduction step of 128 (one scale block) to move as many
    bytes per step as the bf16 ones."""
    per_expert = num_assign / max(1, experts)
    if w8:     # the best of benchmarks/moe_layer_bench.py's fp8 sweeps on an H200 (docs/benchmarks.md): a
        # handful of experts (one token's 8) take 32 gate/up columns a program, for programs enough to fill
        # the GPU; from 16 tokens (128 assignments over 128 experts, one per expert) the wide tiles, and
        # wherever an expert has more than one row (few local experts under expert parallelism)
        return Tiles(16, 32, 128, 64, 128, 4, 4) if experts < 32 and per_expert <= 1 else Tiles(
            16 if per_expert <= 16 else 32 if per_expert <= 48 else 64, 128, 128, 128, 128, 2, 4)
    if dtype == torch.float32:
        return Tiles(bm=16 if per_expert <= 16 else 32, bk1=32, bk2=32, stages=2)
    if per_expert <= 1:                  # a handful of experts: narrow tiles, deep pipeline (H100 sweep)
        return Tiles(16, 64, 64, 64, 64, 6, 4)
    return Tiles(16 if per_expert <= 16 else 32 if per_expert <= 48 else 64, 128, 64, 128, 64, 4, 4)


def weight_scales(w13, w13_scale, w2, w2_scale):
    """(W8, s13, stride, s2, stride): the kernels' scale arguments; the weights stand in unquantized."""
    if w13_scale is None:
        return False, w13, 0, w2, 0
    for w, s in ((w13, w13_scale), (w2, w2_scale)):
        if w.dtype != torch.float8_e4m3fn or list(s.shape) != [w.shape[0], w.shape[1] // 128, w.shape[2] // 128] \
                or w.shape[1] % 128 or w.shape[2] % 128 or s.dtype != torch.float32:
            raise ValueError(f"fp8 experts take float8_e4m3fn weights in 128-multiples with float32 [E, K/128, N/128] "
                             f"scales; got {w.dtype} {list(w.shape)} with {s.dtype} {list(s.shape)}")
    return True, w13_scale.contiguous(), w13_scale.shape[1] * w13_scale.shape[2], w2_scale.contiguous(), \
        w2_scale.shape[1] * w2_scale.shape[2]


def triton_experts(x, topk_ids, topk_weights, w13, w2, act, tiles: Optional[Tiles] = None, *, w13_scale=None,
                   w2_scale=None, residual: Optional[torch.Tensor] = None, pdl: bool = False):
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]); ids are local, -1 = held elsewhere. With w13_scale /
    w2_scale, w13 and w2 are fp8 with 128x128 block scales [E, K/128, N/128]; with residual [T, H]
    (contiguous, x's dtype), residual + that sum (the decoder layer's add, in the same launch). None
    when the activation or dtype is not one the kernels take."""
    name = getattr(act, "__name__", "")
    if name not in _ACTS or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    w8, s13, ss13, s2, ss2 = weight_scales(w13, w13_scale, w2, w2_scale)
    if w8 and x.dtype == torch.float32:
        return None
    rows, k = topk_ids.shape
    experts, hidden, inter = w13.shape[0], w13.shape[1], w2.shape[1]
    num_assign = rows * k
    x = x.contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    tw = topk_weights.reshape(-1).contiguous()
    t = tiles or _tiles(num_assign, min(experts, num_assign), x.dtype, w8)
    ieee = x.dtype == torch.float32
    by_slot = num_assign < experts
    progs = num_assign if by_slot else experts
    h = torch.empty((num_assign, inter), dtype=x.dtype, device=x.device)
    _gate_up_kernel[(progs, triton.cdiv(inter, t.bn1))](
        x, ids, w13, s13, h, num_assign, hidden, inter, w13.stride(0), ss13, k, _ACTS[name], ieee, t.bm, t.bn1, t.bk1,
        by_slot, _SCAN, w8, pdl, num_warps=t.warps, num_stages=t.stages, launch_pdl=pdl)
    y = torch.empty((num_assign, hidden), dtype=x.dtype, device=x.device)
    _down_kernel[(progs, triton.cdiv(hidden, t.bn2))](
        h, ids, tw, w2, s2, y, num_assign, hidden, inter, w2.stride(0), ss2, ieee, t.bm, t.bn2, t.bk2, by_slot, _SCAN,
        w8, pdl, num_warps=t.warps, num_stages=t.stages, launch_pdl=pdl)
    out = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    res = residual is not None
    _sum_kernel[(rows, triton.cdiv(hidden, 1024))](y, ids, out, residual if res else out, hidden, k, 1024, res,
                                                   pdl, num_warps=4, launch_pdl=pdl)
    return out


@cached
@triton.jit
def _topk_kernel(logits_ptr, ids_ptr, w_ptr, E: tl.constexpr, EP: tl.constexpr, K: tl.constexpr,
                 KP: tl.constexpr, RENORM: tl.constexpr, PDL: tl.constexpr = False):
    _pdl.start(PDL)
    t = tl.program_id(0)
    e = tl.arange(0, EP)
    logit = tl.load(logits_ptr + t * E + e, mask=e < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(logit - tl.max(logit, axis=0))
    p = tl.where(e < E, p / tl.sum(p, axis=0), -1.0)
    j = tl.arange(0, KP)
    ids = tl.zeros([KP], tl.int64)
    ws = tl.zeros([KP], tl.float32)
    for i in tl.static_range(K):
        best = tl.max(p, axis=0)
        arg = tl.min(tl.where(p == best, e, EP), axis=0)     # lowest index among ties, as torch.topk
        ids = tl.where(j == i, arg.to(tl.int64), ids)
        ws = tl.where(j == i, best, ws)
        p = tl.where(e == arg, -1.0, p)
    if RENORM:
        ws = ws / tl.sum(ws, axis=0)
    tl.store(ids_ptr + t * K + j, ids, mask=j < K)
    tl.store(w_ptr + t * K + j, ws.to(w_ptr.dtype.element_ty), mask=j < K)


def fused_topk(logits: torch.Tensor, k: int, renormalize: bool, dtype, pdl: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over experts in float32, top-k, optional renormalisation, weights cast to dtype:
    one launch. Returns (weights [T, k], ids [T, k] int64) as FusedMoE.route does."""
    t, e = logits.shape
    ids = torch.empty((t, k), dtype=torch.int64, device=logits.device)
    w = torch.empty((t, k), dtype=dtype, device=logits.device)
    if t:
        _topk_kernel[(t,)](logits.contiguous(), ids, w, e, triton.next_power_of_2(e), k,
                           triton.next_power_of_2(k), renormalize, pdl, num_warps=1 if e <= 256 else 4,
                           launch_pdl=pdl)
    return w, ids
