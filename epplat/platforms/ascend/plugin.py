"""Registers the ascend platform, its HCCL all2all backend, the torchair graph runner, W8A8 quantization,
the LLMDataDist KV connector and the ``epplat ranktable`` command."""

from __future__ import annotations

from epplat.hookspecs import Registration, hookimpl


def _platform():
    from epplat.platforms.ascend.platform import AscendPlatform
    return AscendPlatform


def _check():
    return _platform().check()


def _hccl():
    from epplat.platforms.ascend.all2all_hccl import HcclAll2All
    return HcclAll2All


def _torchair():
    from epplat.platforms.ascend.torchair_runner import TorchairGraphRunner
    return TorchairGraphRunner


def _torchair_check():
    why = _check()
    if why:
        return why
    try:
        import torchair  # noqa: F401  (ships with torch_npu, importable once torch_npu is)
    except ImportError as e:
        return f"torchair not importable ({e}); it ships with torch_npu"
    return None


def _w8a8():
    from epplat.platforms.ascend.w8a8 import AscendW8A8
    return AscendW8A8


@hookimpl
def epplat_platforms():
    return [Registration("ascend", _platform, check=_check, auto_priority=1, help="Huawei Ascend NPUs: torch_npu, HCCL")]


@hookimpl
def epplat_all2all_backends():
    return [Registration("hccl", _hccl, check=_check, platforms=("ascend",),
                         help="all_to_all_single of (token, expert) pairs over HCCL (Ascend's default)")]


@hookimpl
def epplat_graph_runners():
    return [Registration("torchair", _torchair, check=_torchair_check, platforms=("ascend",),
                         help="decode steps as GE graphs through torchair (--additional-config torchair_graph_config)")]


@hookimpl
def epplat_quantization_methods():
    return [Registration("ascend", _w8a8, check=_check, platforms=("ascend",),
                         help="W8A8 dynamic (msModelSlim layout): int8 weights, per-token int8 activations")]


@hookimpl
def epplat_cli_commands(subparsers):
    from epplat.platforms.ascend import ranktable_cli
    ranktable_cli.add_cli(subparsers)


def _llmdatadist():
    from epplat.platforms.ascend.llmdatadist_connector import LLMDataDistCMgrConnector
    return LLMDataDistCMgrConnector


def _llmdatadist_check():
    why = _check()
    if why:
        return why
    import importlib.util
    return None if importlib.util.find_spec("llm_datadist") else "llm_datadist not importable (it ships with CANN)"


@hookimpl
def epplat_kv_connectors():
    return [Registration("LLMDataDistCMgrConnector", _llmdatadist, check=_llmdatadist_check, platforms=("ascend",),
                         help="prefill/decode disaggregation on Ascend: the decode NPU pulls KV blocks through "
                              "llm_datadist (HCCL), devices from DISAGGREGATED_PREFILL_RANK_TABLE_PATH")]
