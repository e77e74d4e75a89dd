"""Registers the cpu platform."""

from __future__ import annotations

from epplat.hookspecs import Registration, hookimpl


def _platform():
    from epplat.platforms.cpu.platform import CpuPlatform
    return CpuPlatform


@hookimpl
def epplat_platforms():
    return [Registration("cpu", _platform, help="reference platform: plain torch on CPU, gloo collectives")]

