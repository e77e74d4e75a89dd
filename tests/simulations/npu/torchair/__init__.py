"""SIMULATION of torchair for tests (see ../README.md): its compile entry points, graphs run on the CPU.

``get_npu_backend`` returns a torch.compile backend that runs the captured FX graph
as it is (torchair would lower it to a GE graph for the NPU). Every backend made and
every config it was made with is recorded in ``calls`` so tests can see what the
product asked for; every graph compiled is recorded as ("graph", shapes of its inputs).

``inference.cache_compile`` follows torchair's cache compiler (Ascend/torchair
python/torchair/inference/_cache_compiler.py at commit 0208753, the one torch-npu 2.13/2.14 ship):
it compiles with ``fullgraph=True`` (a host sync in the model is an error, not a graph break),
lazily on the first call; the cache lives in ``cache_dir`` / ``$TORCHAIR_CACHE_HOME`` /
``./.torchair_cache`` under ``{class}_{static|dynamic}_{md5(repr(module) + options)}/{dist}/{function
name}/compiled_module``; an existing file is reloaded without guards, so the simulation refuses a
reloaded graph whose tensors (arguments and the module's tensor attributes, such as a KV cache)
have other shapes than it was compiled with, where the real graph would compute on wrong shapes.
A recompile of a cached function drops its cache, as torchair does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import types

import torch
import torch.distributed as dist

SIMULATED = True
calls: list = []     # ("get_npu_backend", config) / ("cache_compile", name, config) / ("patch_for_hcom",)


class _Options:
    """A fixed set of options: assigning an unknown one raises, as torchair's configs do."""

    _defaults: dict = {}

    def __init__(self):
        for k, v in self._defaults.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, key, value):
        if key not in self._defaults:
            raise AttributeError(f"{type(self).__name__} has no option {key!r}")
        object.__setattr__(self, key, value)


class _ExperimentalConfig(_Options):
    _defaults = {"frozen_parameter": False, "tiling_schedule_optimize": False, "enable_view_optimize": True,
                 "keep_inference_input_mutations": True}


class CompilerConfig:
    def __init__(self):
        self.mode = "max-autotune"
        self.experimental_config = _ExperimentalConfig()


def get_npu_backend(*, compiler_config: CompilerConfig = None):
    config = compiler_config or CompilerConfig()
    calls.append(("get_npu_backend", config))

    def backend(gm: torch.fx.GraphModule, example_inputs):
        calls.append(("graph", [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]))
        return gm.forward
    return backend


def patch_for_hcom():
    calls.append(("patch_for_hcom",))


def _tensor_shapes(module: torch.nn.Module, args) -> list:
    """Shapes a compiled graph is fixed to: its tensor arguments and the module tree's tensor attributes."""
    shapes = [list(a.shape) for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
    for name, m in module.named_modules():
        for attr, v in vars(m).items():
            for t in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                    shapes.append([f"{name}.{attr}", list(t.shape)])
    return shapes


def _cache_file(func, config, dynamic, cache_dir) -> str:
    """torchair's CompiledModel.get_cache_bin: the key is the module's repr and the options, not its tensors."""
    cache_dir = cache_dir or os.getenv("TORCHAIR_CACHE_HOME", os.path.join(os.getcwd(), ".torchair_cache"))
    md5 = hashlib.md5((str(func.__self__) + repr(sorted(vars(config.experimental_config).items()))).encode())
    dist_dir = (f"world{dist.get_world_size()}global_rank{dist.get_rank()}"
                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else "")
    tag = "dynamic" if dynamic else "static"
    return os.path.join(cache_dir, f"{type(func.__self__).__name__}_{tag}_{md5.hexdigest()}", dist_dir,
                        func.__name__, "compiled_module")


class _LazyCompiled:
    def __init__(self, func, config, backend, dynamic, cache_dir):
        self.func, self.config, self.dynamic = func, config or CompilerConfig(), dynamic
        self.path = _cache_file(func, self.config, dynamic, cache_dir)
        self.backend = backend or get_npu_backend(compiler_config=self.config)
        self.compiled, self.graphs, self.reloaded = None, 0, None

    def _count(self, gm, example_inputs):
        self.graphs += 1
        if self.graphs > 1 and os.path.exists(self.path):     # "Skip cache as ... recompiled": the cache is removed
            os.remove(self.path)
        return self.backend(gm, example_inputs)

    def __call__(self, *args):
        shapes = _tensor_shapes(self.func.__self__, args)
        if self.compiled is None:
            if os.path.exists(self.path):                       # reloaded as it was saved: no guards
                with open(self.path) as f:
                    self.reloaded = json.load(f)
                calls.append(("cache_reload", self.func.__name__, self.path))
                self.compiled = self.func
            else:
                self.compiled = torch.compile(self.func, dynamic=self.dynamic, fullgraph=True, backend=self._count)
        if self.reloaded is not None:
            if shapes != self.reloaded:
                raise RuntimeError(f"the cached graph {self.path} was compiled for other tensor shapes than it is "
                                   "called with (torchair reloads a cache without guards)")
            return self.compiled(*args)
        out = self.compiled(*args)
        if self.graphs == 1 and not os.path.exists(self.path):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "w") as f:
                json.dump(shapes, f)
        return out


class inference:  # noqa: N801  (torchair.inference is a module)
    @staticmethod
    def cache_compile(func, *, config: CompilerConfig = None, backend=None, dynamic: bool = True, cache_dir=None,
                      global_rank=None, tp_rank=None, pp_rank=None, ge_cache: bool = False, **kwargs):
        if not isinstance(func, types.MethodType) or not isinstance(func.__self__, torch.nn.Module):
            raise ValueError("cache_compile compiles a method of a torch.nn.Module")
        calls.append(("cache_compile", func.__name__, config))
        return _LazyCompiled(func, config, backend, dynamic, cache_dir)


# -- torchair.scope: multistream scopes (graph mode) ----------------------------------------------
# On an NPU the ops inside npu_stream_switch(tag) run on a second stream and npu_wait_tensor makes it
# wait for a tensor of the first; here there is one stream, so the ops run in order (the same results).
scope = types.ModuleType("torchair.scope")


@contextlib.contextmanager
def _npu_stream_switch(tag: str, priority: int = 0):
    calls.append(("npu_stream_switch", tag, priority))
    yield


def _npu_wait_tensor(self: torch.Tensor, dependency: torch.Tensor) -> torch.Tensor:
    calls.append(("npu_wait_tensor",))
    return self


scope.npu_stream_switch, scope.npu_wait_tensor = _npu_stream_switch, _npu_wait_tensor
sys.modules["torchair.scope"] = scope
