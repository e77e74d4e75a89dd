"""Registers the cpu platform and the eager (no capture) graph runner."""

from __future__ import annotations

from epplat.hookspecs import Registration, hookimpl


def _platform():
    from epplat.platforms.cpu.platform import CpuPlatform
    return CpuPlatform


def _eager():
    from epplat.core.engine.graph import EagerRunner
    return EagerRunner


@hookimpl
def epplat_platforms():
    return [Registration("cpu", _platform, help="reference platform: plain torch on CPU, gloo collectives")]


@hookimpl
def epplat_graph_runners():
    return [Registration("eager", _eager, help="no graph capture: every step runs eagerly")]
