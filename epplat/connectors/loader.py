"""Builds the connector `--kv-transfer-config` names: a registered one (``epplat plugins``), or the
class of that name in ``kv_connector_module_path``. vLLM's and vllm-ascend's module paths, pasted
from their guides, map to epplat's registered connector of the same name, with one warning."""

from __future__ import annotations

import importlib
import logging

from epplat.config import ConfigError, EngineConfig
from epplat.connectors.base import KVConnectorBase, KVConnectorRole

logger = logging.getLogger(__name__)

_VLLM_MODULES = ("vllm.", "vllm_ascend.")


def connector_class(cfg: EngineConfig, warn: bool = False) -> type[KVConnectorBase]:
    kv = cfg.kv_transfer
    path = kv.kv_connector_module_path
    if path and not path.startswith(_VLLM_MODULES):
        try:
            cls = getattr(importlib.import_module(path), kv.kv_connector)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"--kv-transfer-config: cannot load {kv.kv_connector!r} from "
                              f"kv_connector_module_path {path!r}: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, KVConnectorBase)):
            raise ConfigError(f"--kv-transfer-config: {path}.{kv.kv_connector} is not a KVConnectorBase")
    else:
        from epplat.plugins import PluginError, registry
        if path and warn:
            logger.warning("kv_connector_module_path %r is vLLM's module; using epplat's registered connector %r "
                           "instead", path, kv.kv_connector)
        try:
            cls = registry().load("kv_connector", kv.kv_connector, cfg.platform)
        except PluginError as e:
            raise ConfigError(f"--kv-transfer-config: {e}") from None
    cls.check_config(cfg)
    if cfg.parallel.pipeline_parallel_size > 1 and not cls.pipeline_stages:
        raise ConfigError(f"--kv-transfer-config: {kv.kv_connector} does not run with --pipeline-parallel-size > 1")
    return cls


def make_connector(cfg: EngineConfig, role: KVConnectorRole, dp_rank: int = 0, tp_rank: int = 0, pp_rank: int = 0):
    """The connector side for `role`, or None without --kv-transfer-config."""
    if cfg.kv_transfer is None:
        return None
    cls = connector_class(cfg)
    return cls(cfg.kv_transfer, cfg, role, dp_rank, tp_rank, **({"pp_rank": pp_rank} if pp_rank else {}))
