"""The cpu platform's devices: the core sets of EPPLAT_CPU_OMP_THREADS_BIND (vLLM's VLLM_CPU_OMP_THREADS_BIND).

``0-3|4-7`` gives this node two devices: the engine process of local rank 0 runs on cores
0-3, that of local rank 1 on 4-7 (as vLLM's CPU worker binds its OpenMP threads), so at
most two engine processes start here, and an elastic EP scale-up beyond them is refused.
Unset, ``auto`` or ``nobind``: no binding and no limit (the processes share the cores).
"""

from __future__ import annotations

import os
from typing import Optional

from epplat.config import ConfigError

_UNBOUND = ("", "auto", "nobind")


def core_sets() -> Optional[list[set[int]]]:
    """One set of core ids per local rank, or None when the variable asks for no binding."""
    name = "EPPLAT_CPU_OMP_THREADS_BIND" if "EPPLAT_CPU_OMP_THREADS_BIND" in os.environ else "VLLM_CPU_OMP_THREADS_BIND"
    raw = os.environ.get(name, "").strip()
    if raw in _UNBOUND:
        return None
    sets = []
    try:
        for entry in raw.split("|"):
            cores: set[int] = set()
            for part in entry.split(","):
                lo, _, hi = part.strip().partition("-")
                cores.update(range(int(lo), int(hi or lo) + 1))
            if not cores:
                raise ValueError
            sets.append(cores)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected core lists such as 0-3|4-7 (one per local rank), auto or "
                          "nobind") from None
    return sets


def bind(local_rank: int) -> None:
    """Run this process on its local rank's cores (nothing when unbound)."""
    sets = core_sets()
    if sets is not None:
        try:
            os.sched_setaffinity(0, sets[local_rank])
        except OSError:
            raise ConfigError(f"EPPLAT_CPU_OMP_THREADS_BIND: cores {sorted(sets[local_rank])} (local rank "
                              f"{local_rank}) are not all available to this process") from None
