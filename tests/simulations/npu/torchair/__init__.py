"""SIMULATION of torchair for tests (see ../README.md): its compile entry points, graphs run on the CPU.

``get_npu_backend`` returns a torch.compile backend that runs the captured FX graph
as it is (torchair would lower it to a GE graph for the NPU). Every backend made and
every config it was made with is recorded in ``calls`` so tests can see what the
product asked for.
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch

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
        return gm.forward
    return backend


def patch_for_hcom():
    calls.append(("patch_for_hcom",))


class inference:  # noqa: N801  (torchair.inference is a module)
    @staticmethod
    def cache_compile(func, *, config: CompilerConfig = None, backend=None, dynamic: bool = True, cache_dir=None,
                      global_rank=None, tp_rank=None, pp_rank=None, ge_cache: bool = False, **kwargs):
        if not hasattr(func, "__self__") or not isinstance(func.__self__, torch.nn.Module):
            raise ValueError("cache_compile compiles a method of a torch.nn.Module")
        calls.append(("cache_compile", func.__name__, config))
        return torch.compile(func, dynamic=dynamic, fullgraph=kwargs.get("fullgraph", False),
                             backend=backend or get_npu_backend(compiler_config=config))


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
