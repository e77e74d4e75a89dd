"""Triton kernel launches without JITFunction's per-call host work.

``kernel[grid](*args)`` through Triton's ``JITFunction`` binds the arguments, builds a specialization key
from them and the options, looks up the compiled kernel and checks the globals it read, every call: on the
lent H200 hosts 15-29 us more than launching the ``CompiledKernel`` itself (the sampler's measurement in
docs/benchmarks.md). A prefill step issues ~800 Triton launches, so that is most of the host time that
made a 1 x 2048 step host-bound. ``cached`` wraps a ``@triton.jit`` kernel: the first launch of a
specialization goes through the JITFunction (which compiles or finds the kernel and returns it), later ones
through that ``CompiledKernel``'s own launcher on the current stream.

The key here is finer than Triton's, never coarser, so a cached kernel is one Triton would have chosen:
the current device, every constexpr's value, every tensor's dtype and whether its address is a multiple of
16, every integer's 16-divisibility, whether it is 1 and its width class (i32 / i64 / u64), every bool's and
None's value, and the launch options (parameters left out take their defaults). A launch Triton's rules
could treat otherwise (an argument of another type, a parameter passed by name, a tensor off the GPU,
Triton's interpreter) goes through the JITFunction.
"""

from __future__ import annotations

import inspect

import torch
import triton

_INT32 = 1 << 31
_INT64 = 1 << 63


class CachedKernel:
    """A ``@triton.jit`` kernel launched as ``kernel[grid](*args, **options)``; ``jit`` is the JITFunction."""

    def __init__(self, jit):
        self.jit = jit
        params = getattr(jit, "params", None)
        self.fast = isinstance(jit, triton.runtime.JITFunction) and params is not None
        self.constexpr = tuple(p.is_constexpr for p in params) if self.fast else ()
        self.names = frozenset(p.name for p in params) if self.fast else frozenset()
        self.defaults = [p.default for p in params] if self.fast else []     # inspect.Parameter.empty: none
        self.compiled: dict = {}

    def __getitem__(self, grid):
        return lambda *args, **options: self.launch(grid, args, options)

    def _key(self, args, options):
        """(The specialization key of a launch, or None when it must go through the JITFunction; the arguments
        with the defaults of those left out)."""
        if len(args) < len(self.constexpr):          # trailing parameters left to their defaults
            rest = self.defaults[len(args):]
            if inspect.Parameter.empty in rest:
                return None, args
            args = (*args, *rest)
        if len(args) != len(self.constexpr) or not self.names.isdisjoint(options):
            return None, args
        key = []
        for a, const in zip(args, self.constexpr):
            if const:
                key.append(a)
            elif isinstance(a, torch.Tensor):
                if not a.is_cuda:
                    return None, args
                key.append((a.dtype, a.data_ptr() % 16 == 0))
            elif a is None or isinstance(a, bool):
                key.append((a,))
            elif isinstance(a, int):
                key.append((a % 16 == 0, a == 1, -_INT32 <= a < _INT32, a < _INT64))
            elif isinstance(a, float):
                key.append(float)
            else:
                return None, args
        return (torch.cuda.current_device(), *key, tuple(sorted(options.items()))), args

    def launch(self, grid, args, options):
        key, full = self._key(args, options) if self.fast else (None, args)
        kernel = None if key is None else self.compiled.get(key)
        if kernel is None:
            kernel = self.jit[grid](*args, **options)
            if key is not None and kernel is not None:
                self.compiled[key] = kernel
            return kernel
        grid = tuple(grid) + (1,) * (3 - len(grid))        # the CompiledKernel's launcher takes three axes
        kernel[grid](*full, stream=triton.runtime.driver.active.get_current_stream(key[0]))
        return kernel


def cached(jit) -> CachedKernel:
    """Decorator, above ``@triton.jit``: launches of the kernel skip JITFunction's work after the first."""
    return CachedKernel(jit)
