"""Lazily zeroed host buffers backed by transparent huge pages where the kernel allows them
(`madvise(MADV_HUGEPAGE)`; the machine's THP mode "madvise" grants them only on request). The KV
cache is one: NIXL's UCX moves host KV blocks between processes with process_vm_readv (the cma
transport), which pins and copies the pages one at a time, and on 2 MiB pages it ran about twice as
fast against memcpy (benchmarks/nixl_bandwidth.py, docs/benchmarks.md); attention's reads of the
cache take fewer TLB misses too."""

from __future__ import annotations

import ctypes
import logging
import math

import numpy as np
import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor whose pages the OS hands out on first touch (calloc, never memset), asked for
    as huge pages over every whole 2 MiB inside it."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    raw = np.zeros(math.prod(shape) * itemsize, dtype=np.uint8)
    start = -(-raw.ctypes.data // HUGE_PAGE) * HUGE_PAGE
    end = (raw.ctypes.data + raw.nbytes) // HUGE_PAGE * HUGE_PAGE
    if end > start and _libc.madvise(start, end - start, MADV_HUGEPAGE) != 0:
        # a kernel without THP (EINVAL): the buffer works as it is, on small pages
        logger.debug("madvise(MADV_HUGEPAGE) refused (errno %d): small pages", ctypes.get_errno())
    return torch.from_numpy(raw).view(dtype).view(shape)
