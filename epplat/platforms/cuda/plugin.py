"""Registers the cuda platform."""

from __future__ import annotations

from epplat.hookspecs import Registration, hookimpl


def _check():
    from epplat.platforms.cuda.platform import CudaPlatform
    return CudaPlatform.check()


def _platform():
    from epplat.platforms.cuda.platform import CudaPlatform
    return CudaPlatform


@hookimpl
def epplat_platforms():
    return [Registration("cuda", _platform, check=_check, help="NVIDIA GPUs: NCCL collectives")]
