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
import triton.knobs

_INT32 = 1 << 31
_INT64 = 1 << 63
_TENSOR, _PARAMETER = torch.Tensor, torch.nn.Parameter


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
        with the defaults of those left out). The key is flat: a tensor gives its dtype (a torch.dtype, which
        no other parameter kind gives) and its alignment, any other argument one entry, so the entries read
        back one way only."""
        if len(args) < len(self.constexpr):          # trailing parameters left to their defaults
            rest = self.defaults[len(args):]
            if inspect.Parameter.empty in rest:
                return None, args
            args = (*args, *rest)
        if len(args) != len(self.constexpr) or (options and not self.names.isdisjoint(options)):
            return None, args
        key = [torch.cuda.current_device()]
        add = key.append
        for a, const in zip(args, self.constexpr):
            t = type(a)
            if const:
                add(a)
            elif t is _TENSOR or t is _PARAMETER:
                if not a.is_cuda:
                    return None, args
                add(a.dtype)
                add(a.data_ptr() & 15 == 0)
            elif t is int:      # 16-divisible, equal to 1, width class (i32 / i64 / u64): as ints from 2 up
                add(2 + (a & 15 == 0) + 2 * (a == 1) + 4 * (-_INT32 <= a < _INT32) + 8 * (a < _INT64))
            elif t is bool or a is None:
                add(a)
            elif t is float:
                add(float)
            else:
                return None, args
        if options:
            key.append(tuple(sorted(options.items())))
        return tuple(key), args

    def launch(self, grid, args, options):
        key, full = self._key(args, options) if self.fast else (None, args)
        entry = None if key is None else self.compiled.get(key)
        if entry is None:
            kernel = self.jit[grid](*args, **options)
            if key is not None and kernel is not None:
                self.compiled[key] = (kernel, *_direct(kernel))
            return kernel
        kernel, run, function, packed = entry
        grid = tuple(grid) + (1,) * (3 - len(grid))        # the CompiledKernel's launcher takes three axes
        stream = _current_stream(key[0])
        hooks = triton.knobs.runtime
        if run is None or hooks.launch_enter_hook is not None or hooks.launch_exit_hook is not None:
            kernel[grid](*full, stream=stream)
        else:
            run(grid[0], grid[1], grid[2], stream, function, packed, None, None, None, *full)
        return kernel


# CompiledKernel.__getitem__(grid)(*args, stream=s) builds a closure and a launch-metadata record each call, for
# launch hooks (profilers); with no hook set it ends in this call of the kernel's launcher, made here directly
# where this Triton's runner reads so (else the runner, as before)
_RUNNER_CALL = ("self.run(grid[0], grid[1], grid[2], stream, self.function, self.packed_metadata, "
                "launch_metadata,")
try:
    _DIRECT = _RUNNER_CALL in " ".join(inspect.getsource(triton.compiler.CompiledKernel.__getitem__).split())
except (OSError, TypeError, AttributeError):
    _DIRECT = False
_current_stream = None


def _direct(kernel):
    """(launcher, function handle, packed metadata) of a CompiledKernel, or Nones where the runner must run."""
    global _current_stream
    if _current_stream is None:
        _current_stream = triton.runtime.driver.active.get_current_stream
    if not _DIRECT:
        return None, None, None
    run = kernel.run                    # loads the module (CompiledKernel._init_handles)
    return run, kernel.function, kernel.packed_metadata


def cached(jit) -> CachedKernel:
    """Decorator, above ``@triton.jit``: launches of the kernel skip JITFunction's work after the first."""
    return CachedKernel(jit)
