"""A MoE layer's entry at decode sizes in one Triton launch: residual add, RMSNorm, router GEMM,
softmax, top-k and renormalisation.

``x + attn`` (the new residual, rounded to the dtype as torch's add rounds it), its RMSNorm
(float32, rounded, times the weight: epplat.core.model.layers), the router logits
``norm(x) @ gate.T`` rounded to the dtype (what the bf16 linear returns), then FusedMoE.route's
float32 softmax, top-k (lowest index among ties, as torch.topk) and optional renormalisation.
The module path runs this as five kernels (add, norm, a cuBLAS GEMM, top-k; at batch 1 each
mostly launch latency). Each program takes BE experts of BT tokens (recomputing the tokens'
norm, a few KB); program 0 of a token block also stores the residual and the normed rows;
the last program of a token block to store its logits, told so by an atomic counter
(triton_attention.counters), picks the top-k of the block and resets the counter.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from epplat.platforms.cuda.triton_attention import counters

MAX_TOKENS = 64     # above this, the module path (a cuBLAS router GEMM is then the better GEMM)
_BT, _BE = 16, 16   # tokens and experts per program (tl.dot's smallest tile)


@triton.jit
def _residual(x_ptr, a_ptr, tok, tm, kk, HIDDEN: tl.constexpr, dt: tl.constexpr):
    off = tok[:, None].to(tl.int64) * HIDDEN + kk[None, :]
    x = tl.load(x_ptr + off, mask=tm[:, None], other=0.0).to(tl.float32)
    a = tl.load(a_ptr + off, mask=tm[:, None], other=0.0).to(tl.float32)
    return (x + a).to(dt).to(tl.float32)


@triton.jit(do_not_specialize=["tokens"])
def _add_norm_route_kernel(x_ptr, a_ptr, nw_ptr, gate_ptr, res_ptr, h_ptr, logits_ptr, cnt_ptr, ids_ptr, w_ptr,
                           tokens, eps, HIDDEN: tl.constexpr, E: tl.constexpr, EP: tl.constexpr, K: tl.constexpr,
                           KP: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
                           RENORM: tl.constexpr, IEEE: tl.constexpr):
    pe = tl.program_id(0)
    pt = tl.program_id(1)
    dt = h_ptr.dtype.element_ty
    tok = pt * BT + tl.arange(0, BT)
    tm = tok < tokens
    ss = tl.zeros([BT], tl.float32)
    for k0 in range(0, HIDDEN, BK):
        r = _residual(x_ptr, a_ptr, tok, tm, k0 + tl.arange(0, BK), HIDDEN, dt)
        ss += tl.sum(r * r, axis=1)
    rstd = 1.0 / tl.sqrt(ss / HIDDEN + eps)
    e = pe * BE + tl.arange(0, BE)
    em = e < E
    acc = tl.zeros([BT, BE], tl.float32)
    for k0 in range(0, HIDDEN, BK):
        kk = k0 + tl.arange(0, BK)
        r = _residual(x_ptr, a_ptr, tok, tm, kk, HIDDEN, dt)
        w = tl.load(nw_ptr + kk).to(tl.float32)
        h = (w[None, :] * (r * rstd[:, None]).to(dt).to(tl.float32)).to(dt)
        if pe == 0:
            off = tok[:, None].to(tl.int64) * HIDDEN + kk[None, :]
            tl.store(res_ptr + off, r.to(dt), mask=tm[:, None])
            tl.store(h_ptr + off, h, mask=tm[:, None])
        g = tl.load(gate_ptr + e[None, :].to(tl.int64) * HIDDEN + kk[:, None], mask=em[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(h, g, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, g, acc)
    lrow = logits_ptr + tok[:, None].to(tl.int64) * EP
    tl.store(lrow + e[None, :], acc.to(dt).to(tl.float32), mask=tm[:, None] & em[None, :])
    tl.debug_barrier()                                 # every thread's logits stored before the release
    arrived = tl.atomic_add(cnt_ptr + pt, 1)           # acq_rel, gpu scope
    tl.debug_barrier()
    if arrived == tl.num_programs(0) - 1:              # the token block's last expert slice: its top-k
        ee = tl.arange(0, EP)
        logit = tl.load(lrow + ee[None, :], mask=tm[:, None] & (ee < E)[None, :], other=float("-inf"),
                        cache_modifier=".cg")
        logit = tl.where(tm[:, None], logit, 0.0)      # rows past the batch: finite, never stored
        p = tl.exp(logit - tl.max(logit, axis=1)[:, None])
        p = tl.where((ee < E)[None, :], p / tl.sum(p, axis=1)[:, None], -1.0)
        j = tl.arange(0, KP)
        ids = tl.zeros([BT, KP], tl.int64)
        ws = tl.zeros([BT, KP], tl.float32)
        for i in tl.static_range(K):
            best = tl.max(p, axis=1)
            arg = tl.min(tl.where(p == best[:, None], ee[None, :], EP), axis=1)
            ids = tl.where(j[None, :] == i, arg[:, None].to(tl.int64), ids)
            ws = tl.where(j[None, :] == i, best[:, None], ws)
            p = tl.where(ee[None, :] == arg[:, None], -1.0, p)
        if RENORM:
            ws = ws / tl.sum(ws, axis=1)[:, None]
        out = tok[:, None].to(tl.int64) * K + j[None, :]
        om = tm[:, None] & (j < K)[None, :]
        tl.store(ids_ptr + out, ids, mask=om)
        tl.store(w_ptr + out, ws.to(w_ptr.dtype.element_ty), mask=om)
        tl.atomic_xchg(cnt_ptr + pt, 0)


def add_norm_route(x: torch.Tensor, attn: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate: torch.Tensor,
                   top_k: int, renormalize: bool) -> Optional[tuple]:
    """(x + attn, rms_norm(x + attn), weights [T, k] in x's dtype, ids [T, k] int64) for x, attn [T, H]
    and a router gate [E, H]; None for inputs the kernel does not take (more than MAX_TOKENS rows, a
    hidden size off 128s, mixed dtypes)."""
    t, hidden = x.shape
    e = gate.shape[0]
    if (t > MAX_TOKENS or t == 0 or hidden % 128 or not (x.dtype == attn.dtype == norm_weight.dtype == gate.dtype)
            or not (x.is_contiguous() and attn.is_contiguous() and gate.is_contiguous()) or top_k > e):
        return None
    blocks = triton.cdiv(t, _BT)
    cnt = counters(x.device, blocks)
    if cnt is None:
        return None
    ep = triton.next_power_of_2(e)
    res, h = torch.empty_like(x), torch.empty_like(x)
    logits = torch.empty((t, ep), dtype=torch.float32, device=x.device)
    ids = torch.empty((t, top_k), dtype=torch.int64, device=x.device)
    w = torch.empty((t, top_k), dtype=x.dtype, device=x.device)
    ieee = x.dtype == torch.float32
    _add_norm_route_kernel[(triton.cdiv(e, _BE), blocks)](
        x, attn, norm_weight, gate, res, h, logits, cnt, ids, w, t, eps, hidden, e, ep, top_k,
        triton.next_power_of_2(top_k), _BT, _BE, 64 if ieee else 128, renormalize, ieee, num_warps=4)
    return res, h, w, ids
