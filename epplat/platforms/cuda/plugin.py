"""Registers the cuda platform."""

from __future__ import annotations

from epplat.hookspecs import Registration, hookimpl


def _check():
    from epplat.platforms.cuda.platform import CudaPlatform
    return CudaPlatform.check()


def _platform():
    from epplat.platforms.cuda.platform import CudaPlatform
    return CudaPlatform


def _graphs():
    from epplat.platforms.cuda.graphs import CudaGraphRunner
    return CudaGraphRunner


def _triton_check():
    import importlib.util
    return _check() or (None if importlib.util.find_spec("triton") else "triton not installed")


@hookimpl
def epplat_platforms():
    return [Registration("cuda", _platform, check=_check, help="NVIDIA GPUs: NCCL collectives, Triton, CUDA graphs")]


def _fp8():
    from epplat.platforms.cuda.fp8 import Fp8BlockQuant
    return Fp8BlockQuant


@hookimpl
def epplat_quantization_methods():
    return [Registration("fp8", _fp8, check=_triton_check, platforms=("cuda",),
                         help="fp8 MoE experts, 128x128 block scales, per-token-group activations (Triton); "
                              "also quantizes bf16 checkpoints at load")]


@hookimpl
def epplat_graph_runners():
    return [Registration("cuda_graphs", _graphs, check=_triton_check, platforms=("cuda",),
                         help="CUDA graphs of decode steps (--enforce-eager turns them off)")]
