"""Builds kernels.c with the system C compiler on first use and wraps it for torch tensors.

The shared library is cached under ``$EPPLAT_CACHE_DIR/kernels`` (default
``~/.cache/epplat/kernels``) by a hash of the source and flags; building takes about a
second. The wrappers take the same arguments as the portable torch paths they stand in
for (``sample``: the law of the sampler's draw, from its own noise) and return None for
inputs they do not handle (non-float32, shapes off the 8/16 grid, linears over more rows
than the few where MKL's per-call weight packing loses), so the caller runs the torch path then.
When no compiler (or no AVX2/FMA) is there, :func:`load` logs one warning and the
platform keeps the torch paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

from epplat.config import cache_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
# Above this many rows, MKL's GEMM is faster than reading each weight row once.
MAX_LINEAR_ROWS = 32

# tokens of a sampling draw a thread takes at least (about 4 ms of work): on the shared 2-core VM a
# second thread for a batch of 16 (2.4M tokens) made the draw 2.8x slower (4.6 against 1.7 ms)
RACE_TOKENS_PER_THREAD = 1 << 22
# OpenMP threads of the kernels; the cpu platform sets its whole thread budget here (decode
# steps run torch's own ops on one thread, where fork/join costs more than it saves)
THREADS = 1
_lib: Optional[ctypes.CDLL] = None
_tried = False


def _build() -> Path:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler found (install gcc or set CC)")
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"epplat_cpu_{tag}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)   # several processes may build at once
    os.close(fd)
    r = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
    if r.returncode:
        os.unlink(tmp)
        raise RuntimeError(f"{cc} failed: {(r.stderr.strip().splitlines() or ['?'])[0]}")
    os.replace(tmp, out)
    return out


def load() -> Optional[ctypes.CDLL]:
    """The kernel library, built if needed; None (with one warning) when it cannot be built."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("EPPLAT_CPU_KERNELS", "1") == "0":
        logger.info("CPU kernels off (EPPLAT_CPU_KERNELS=0): torch ops for experts and decode attention")
        return None
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        logger.warning("CPU kernels need AVX2/FMA, this CPU has %s: using torch ops (slower)",
                       torch.backends.cpu.get_cpu_capability())
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (RuntimeError, OSError) as e:
        logger.warning("CPU kernels unavailable (%s): using torch ops for experts and decode attention (slower)", e)
        return None
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.moe_experts.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ctypes.c_int]
    lib.decode_attention.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, f32, ptr, ptr, i64,
                                     ctypes.c_int]
    lib.moe_work_floats.argtypes, lib.moe_work_floats.restype = [i64, i64], i64
    lib.linear.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int]
    lib.write_kv.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr]
    lib.route_topk.argtypes = [ptr, i64, i64, i64, ctypes.c_int, ptr, ptr]
    lib.sample_race.argtypes = [ptr, i64, i64, ptr, i64, ptr, f32, ptr, ctypes.c_int]
    lib.apply_bitmask.argtypes = [ptr, i64, ptr, ptr, i64]
    lib.rms_norm.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, f32, ptr]
    lib.rope.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr]
    lib.decode_layer_floats.argtypes = [i64] * 9 + [ctypes.c_int]
    lib.decode_layer_floats.restype = i64
    lib.decode_layer.argtypes = ([ptr, i64, i64, ptr, ptr, f32, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr]
                                 + [ptr] * 5 + [i64, i64, f32, ptr, ptr, i64, i64, ctypes.c_int, ptr, ptr, i64, ptr,
                                                ctypes.c_int])
    _lib = lib
    return lib


def _f32(*ts) -> bool:
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in ts)


def moe_experts(x, topk_ids, topk_weights, w13, w2, act) -> Optional[torch.Tensor]:
    """reference_experts for float32 SiLU-gated experts (decode and prefill); None otherwise."""
    rows, k = topk_ids.shape
    num_experts, hidden, inter2 = w13.shape
    # k <= 64: the kernel orders a token's experts in a fixed 64-entry array
    if act is not torch.nn.functional.silu or not _f32(x, w13, w2) or hidden % 16 or inter2 % 32 or k > 64:
        return None
    ids = topk_ids.to(torch.int64).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    threads = THREADS
    out = torch.empty_like(x)
    scratch = torch.empty(rows * k * hidden + threads * _lib.moe_work_floats(hidden, inter2 // 2), dtype=torch.float32)
    _lib.moe_experts(x.data_ptr(), rows, hidden, ids.data_ptr(), weights.data_ptr(), k, w13.data_ptr(),
                     w2.data_ptr(), num_experts, inter2 // 2, out.data_ptr(), scratch.data_ptr(), threads)
    return out


def linear(x, w, bias=None) -> Optional[torch.Tensor]:
    """F.linear for float32 batches of at most MAX_LINEAR_ROWS rows; None otherwise."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if (rows > MAX_LINEAR_ROWS or k % 8 or not _f32(w) or x.dtype != torch.float32
            or (bias is not None and not _f32(bias))):
        return None
    x2 = x.reshape(rows, k).contiguous()
    out = torch.empty(rows, w.shape[0], dtype=torch.float32)
    _lib.linear(x2.data_ptr(), rows, k, w.data_ptr(), w.shape[0], bias.data_ptr() if bias is not None else None,
                out.data_ptr(), THREADS)
    return out.view(*x.shape[:-1], w.shape[0])


def decode_attention(q, k_cache, v_cache, tables, lens, scale) -> Optional[torch.Tensor]:
    """One query token per sequence over the paged cache, float32; None for other dtypes."""
    b, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    if not _f32(k_cache, v_cache) or q.dtype != torch.float32 or d % 8 or h % kvh:
        return None
    q = q.contiguous()
    tables = tables.to(torch.int64).contiguous()
    lens = lens.to(torch.int64).contiguous()
    max_len = tables.shape[1] * bs
    threads = THREADS
    out = torch.empty_like(q)
    scratch = torch.empty(threads * h * max_len, dtype=torch.float32)
    _lib.decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(),
                          b, h, kvh, d, bs, tables.shape[1], scale, out.data_ptr(), scratch.data_ptr(), max_len,
                          threads)
    return out


def _rows(x: torch.Tensor):
    """(n0, n1, s0, s1) addressing x's rows of its last dimension, or None if they are not
    two-level strided with unit stride inside a row."""
    if x.stride(-1) != 1:
        return None
    if x.dim() == 2:
        return x.shape[0], 1, x.stride(0), 0
    if x.dim() == 3:
        return x.shape[0], x.shape[1], x.stride(0), x.stride(1)
    return None


def rms_norm(x, weight, eps) -> Optional[torch.Tensor]:
    """RMSNorm over the last dimension of a 2-D or 3-D float32 tensor (may be a strided view)."""
    rows = _rows(x)
    if rows is None or x.dtype != torch.float32 or not _f32(weight) or x.shape[-1] % 8:
        return None
    out = torch.empty(x.shape, dtype=torch.float32)
    _lib.rms_norm(x.data_ptr(), *rows, x.shape[-1], weight.data_ptr(), eps, out.data_ptr())
    return out


def rope(positions, q, k, cos, sin) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Neox rotary embedding of q [T, H, D] and k [T, KVH, D] (strided views allowed)."""
    rq, rk = _rows(q), _rows(k)
    if (rq is None or rk is None or q.dim() != 3 or q.dtype != torch.float32 or k.dtype != torch.float32
            or not _f32(cos, sin) or q.shape[-1] % 16):
        return None
    pos = positions.to(torch.int64).contiguous()
    outs = []
    for x, r in ((q, rq), (k, rk)):
        out = torch.empty(x.shape, dtype=torch.float32)
        _lib.rope(x.data_ptr(), *r, x.shape[-1], pos.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr())
        outs.append(out)
    return outs[0], outs[1]


def route_topk(logits, top_k: int, renormalize: bool, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing: (weights [T, top_k] in ``dtype``, expert ids [T, top_k]), as FusedMoE.route."""
    logits = logits.float().contiguous()
    t, e = logits.shape
    weights = torch.empty(t, top_k, dtype=torch.float32)
    ids = torch.empty(t, top_k, dtype=torch.int64)
    _lib.route_topk(logits.data_ptr(), t, e, top_k, int(renormalize), weights.data_ptr(), ids.data_ptr())
    return weights.to(dtype), ids


def sample(logits, temperature, keys) -> Optional[torch.Tensor]:
    """One token a row of float32 logits [B, V], drawn from softmax(logits / temperature) in one
    pass (Kernels.sample); temperature and keys are numbers for every row or [B] tensors."""
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(-1) != 1:
        return None
    b = logits.shape[0]
    logits = logits.contiguous()
    inv_t = (1.0 / temperature).to(torch.float32).contiguous() if isinstance(temperature, torch.Tensor) else None
    keys = keys.to(torch.int64).contiguous() if isinstance(keys, torch.Tensor) else keys
    out = torch.empty(b, dtype=torch.int64)
    # a thread a RACE_TOKENS_PER_THREAD tokens: below that a fork/join costs more than it saves
    threads = max(1, min(THREADS, logits.numel() // RACE_TOKENS_PER_THREAD))
    if _lib.sample_race(logits.data_ptr(), b, logits.shape[1], None if isinstance(keys, int) else keys.data_ptr(),
                        keys if isinstance(keys, int) else 0, None if inv_t is None else inv_t.data_ptr(),
                        1.0 / temperature if inv_t is None else 0.0, out.data_ptr(), threads):
        raise MemoryError("sample_race: out of memory")
    return out


def apply_bitmask(logits, mask, rows) -> Optional[bool]:
    """Kernels.apply_bitmask: -inf in place where the packed int32 mask [len(rows), ceil(V / 32)] bans a token
    of logits [B, V] (float32, contiguous); None for other inputs."""
    if logits.dtype != torch.float32 or not logits.is_contiguous() or mask.dtype != torch.int32:
        return None
    v = logits.shape[1]
    mask = mask.contiguous()
    if mask.shape != (len(rows), (v + 31) // 32):
        return None
    idx = torch.tensor(rows, dtype=torch.int64)
    _lib.apply_bitmask(logits.data_ptr(), v, mask.data_ptr(), idx.data_ptr(), len(rows))
    return True


def write_kv(k, v, k_cache, v_cache, slots) -> bool:
    """Copy k/v [T, KVH, D] into the cache slots (float32, contiguous); False when it does not take them."""
    if not _f32(k, v, k_cache, v_cache):
        return False
    slots = slots.to(torch.int64).contiguous()
    row = k.shape[1] * k.shape[2]
    _lib.write_kv(k.data_ptr(), v.data_ptr(), k.shape[0], row, slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr())
    return True
