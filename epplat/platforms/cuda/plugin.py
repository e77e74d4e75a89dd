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
    return [Registration("cuda", _platform, check=_check, auto_priority=1,
                         help="NVIDIA GPUs: NCCL collectives, Triton, CUDA graphs")]


def _nvshmem():
    from epplat.platforms.cuda.all2all_nvshmem import NvshmemAll2All
    return NvshmemAll2All


def _nvshmem_check():
    from epplat.platforms.cuda.all2all_nvshmem import check
    return check()


def _needs(package: str, install: str):
    """check(): None when `package` imports here, else the one line naming it."""
    import importlib.util
    return lambda: _check() or (None if importlib.util.find_spec(package) else f"{package} not installed ({install})")


def _deepep(name: str):
    def load():
        from epplat.platforms.cuda import all2all_deepep
        return getattr(all2all_deepep, name)
    return load


def _no_adapter(package: str):
    def load():
        from epplat.plugins import PluginError
        raise PluginError(f"{package} is installed, but epplat's adapter for it is not written yet; "
                          "use --all2all-backend nvshmem or allgather_reducescatter")
    return load


@hookimpl
def epplat_all2all_backends():
    return [
        Registration("nvshmem", _nvshmem, check=_nvshmem_check, platforms=("cuda",),
                     help="(token, expert) pairs over NVSHMEM symmetric memory (torch all_to_all_vdev), "
                          "device-side split sizes"),
        Registration("deepep_high_throughput", _deepep("DeepEPHighThroughput"), platforms=("cuda",),
                     check=_needs("deep_ep", "build DeepEP from github.com/deepseek-ai/DeepEP"),
                     help="DeepEP normal kernels (prefill); needs deep_ep"),
        Registration("deepep_low_latency", _deepep("DeepEPLowLatency"), platforms=("cuda",),
                     check=_needs("deep_ep", "build DeepEP from github.com/deepseek-ai/DeepEP"),
                     help="DeepEP low-latency kernels (decode); needs deep_ep"),
        Registration("pplx", _no_adapter("pplx_kernels"), platforms=("cuda",),
                     check=lambda: "epplat's adapter for pplx_kernels is not written yet",
                     help="pplx-kernels all-to-all; needs pplx_kernels"),
    ]


def _fp8():
    def make(cfg, canonical_name):
        if cfg.platform == "cpu":      # no fp8 GEMM there: the checkpoint's fp8 weights are dequantized at load
            from epplat.platforms.cpu.fp8_dequantize import Fp8Dequantize
            return Fp8Dequantize(cfg, canonical_name)
        if why := _triton_check():
            from epplat.plugins import PluginError
            raise PluginError(f"--quantization fp8 is not usable here: {why}")
        from epplat.platforms.cuda.fp8 import Fp8BlockQuant
        return Fp8BlockQuant(cfg, canonical_name)
    return make


@hookimpl
def epplat_quantization_methods():
    return [Registration("fp8", _fp8, platforms=("cuda", "cpu"),
                         help="cuda: DeepSeek-V3's fp8 checkpoints (128x128 block scales, per-token-group "
                              "activations, Triton), bf16 ones quantized at load (experts); cpu: fp8 checkpoints "
                              "dequantized at load")]


@hookimpl
def epplat_graph_runners():
    return [Registration("cuda_graphs", _graphs, check=_triton_check, platforms=("cuda",),
                         help="CUDA graphs of decode steps (--enforce-eager turns them off)")]
