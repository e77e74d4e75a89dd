"""The noise and draw of Kernels.sample written out in numpy, float64: Philox4x32-10 keyed by a row's
64-bit key, counter (j / 1024) * 256 + j % 256 for token j, output (j % 1024) / 256, then
argmax_j(x_j / T - ln E_j) with E_j = -ln(1 - v_j), v_j = (u_j / 2 + 1/2) 2^-31 (the top 31 bits).
The cpu and cuda kernels must pick the token this picks (but for rounding at near-ties)."""

from __future__ import annotations

import numpy as np

M32 = np.uint64(0xFFFFFFFF)


def philox4x32(c0: np.ndarray, key: int) -> np.ndarray:
    """[4, n] outputs of Philox4x32-10 for counters (c0, 0, 0, 0)."""
    c0 = c0.astype(np.uint64)
    c1 = c2 = c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> np.uint64(32)) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & M32, (k1 + np.uint64(0xBB67AE85)) & M32
    return np.stack([c0, c1, c2, c3])


def race_token(logits_row, temperature: float, key: int) -> int:
    x = np.asarray(logits_row, dtype=np.float64)
    j = np.arange(len(x))
    u = philox4x32(j // 1024 * 256 + j % 256, key)[(j % 1024) // 256, j]
    v = np.minimum((u >> np.uint64(1)).astype(np.float64) * 2.0 ** -31 + 2.0 ** -32, 1 - 2.0 ** -24)
    return int(np.argmax(x / temperature - np.log(-np.log1p(-v))))
