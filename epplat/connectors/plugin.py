"""Registers the platform-independent KV connectors."""

from __future__ import annotations

from epplat.hookspecs import Registration, hookimpl


def _decode_bench():
    from epplat.connectors.decode_bench import DecodeBenchConnector
    return DecodeBenchConnector


def _nixl():
    from epplat.connectors.nixl import NixlConnector
    return NixlConnector


def _nixl_check():
    import importlib.util
    return None if importlib.util.find_spec("nixl") else "nixl not installed (pip install 'epplat[nixl]')"


@hookimpl
def epplat_kv_connectors():
    return [Registration("DecodeBenchConnector", _decode_bench,
                         help="fills new requests' KV with constants instead of prefill (decode benchmarks)"),
            Registration("NixlConnector", _nixl, check=_nixl_check, platforms=("cpu", "cuda"),
                         help="prefill/decode disaggregation: the decode side READs KV blocks through NIXL (UCX)")]
