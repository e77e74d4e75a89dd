"""Registers the ascend platform."""

from __future__ import annotations

from epplat.hookspecs import Registration, hookimpl


def _platform():
    from epplat.platforms.ascend.platform import AscendPlatform
    return AscendPlatform


def _check():
    return _platform().check()


@hookimpl
def epplat_platforms():
    return [Registration("ascend", _platform, check=_check, help="Huawei Ascend NPUs: torch_npu, HCCL")]
