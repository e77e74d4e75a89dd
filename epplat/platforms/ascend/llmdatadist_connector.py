"""LLMDataDistCMgrConnector (vllm-ascend's name, config and flow) on CANN's ``llm_datadist``: the
decode side pulls the KV blocks a prefill instance holds straight out of the prefill NPU's cache
over HCCL. The request flow (what is held, what is pulled, the kv_transfer_params) is
connectors/pull.py's; this module is the worker side.

Each worker finds its device in the ranktable ``epplat ranktable`` writes
(DISAGGREGATED_PREFILL_RANK_TABLE_PATH): the ``prefill_device_list`` (kv_producer) or
``decode_device_list`` (kv_consumer) entries whose ``server_id`` is this host's IP (VLLM_HOST_IP, else
the address of the default route) and whose ``device_id`` is visible (ASCEND_RT_VISIBLE_DEVICES),
the one at its NPU index. Its ``cluster_id`` names it to llm_datadist: ``LLMDataDist(PROMPT or
DECODER, cluster_id)``, initialised with the cache manager and remote cache access, its KV caches
(K and V of every layer) registered as one blocks cache. A side channel per worker
(VLLM_ASCEND_LLMDD_RPC_IP : VLLM_ASCEND_LLMDD_RPC_PORT + DP rank; authenticated with the
deployment's secret) exchanges the devices' metadata, after which both sides ``link`` the pair
(a two-device ranktable); the decode side leases the request's blocks, ``pull_blocks`` them and
says it has finished reading, which frees them on the prefill side. Pulls run on a thread: other
requests keep stepping. A failed pull recomputes the prompt locally, with a warning.

With tensor parallelism every TP rank is a ranktable device of its own (its side channel at
VLLM_ASCEND_LLMDD_RPC_PORT + DP rank x TP size + TP rank) holding its KV heads; decode TP rank r
pulls whole blocks from prefill TP rank r, so both sides need the same TP size (pull_blocks moves
whole blocks of one registered cache; a different size is refused, in the config when its
kv_connector_extra_config says so, else at the pull, which recomputes with a warning). The TP
workers report their pulls and freed blocks to their driver (connectors/tp_ranks.py).

kv_connector_extra_config ``{"prefill": {"dp_size", "tp_size"}, "decode": {...}}`` (vllm-ascend's
keys) is checked against this server's layout for its own role. Limits: the same TP size on both
sides; kv_both is refused (as vllm-ascend does).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from epplat.config import ConfigError
from epplat.connectors import side_channel
from epplat.connectors.pull import HeldBlocks, Pull, PullConnector, compat, compat_error
from epplat.connectors.tp_ranks import TPReports
from epplat.platforms.ascend import ranktable

logger = logging.getLogger(__name__)

RANKTABLE_ENV = "DISAGGREGATED_PREFILL_RANK_TABLE_PATH"
_LAYOUT_KEYS = {"dp_size", "tp_size"}


def load_llm_datadist():
    try:
        import llm_datadist
    except ImportError as e:
        raise ConfigError(f"LLMDataDistCMgrConnector needs llm_datadist, which ships with CANN ({e})") from None
    return llm_datadist


def local_ip() -> str:
    ip = os.environ.get("VLLM_HOST_IP") or os.environ.get("EPPLAT_HOST_IP")
    if ip:
        return ip
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 80))          # no packet is sent: this picks the default route's address
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _datatype(dd, dtype):
    import torch
    names = {torch.float32: "DT_FLOAT", torch.float16: "DT_FLOAT16", torch.bfloat16: "DT_BF16",
             torch.int8: "DT_INT8", torch.int32: "DT_INT32", torch.int64: "DT_INT64"}
    if dtype not in names:
        raise ConfigError(f"LLMDataDistCMgrConnector: no llm_datadist data type for a {dtype} KV cache")
    return getattr(dd.DataType, names[dtype])


class LLMDataDistCMgrConnector(PullConnector):
    @classmethod
    def check_config(cls, engine) -> None:
        kv, par = engine.kv_transfer, engine.parallel
        name = "LLMDataDistCMgrConnector"
        if kv.kv_role not in ("kv_producer", "kv_consumer"):
            raise ConfigError(f"{name}: kv_role must be kv_producer or kv_consumer, not {kv.kv_role}")
        path = os.environ.get(RANKTABLE_ENV)
        if not path:
            raise ConfigError(f"{name}: set {RANKTABLE_ENV} to the ranktable `epplat ranktable` wrote")
        try:
            ranktable.load(path)
        except ranktable.RanktableError as e:
            raise ConfigError(f"{name}: {RANKTABLE_ENV}: {e}") from None
        extra = kv.kv_connector_extra_config
        mine = "prefill" if kv.is_producer else "decode"
        for side in ("prefill", "decode"):
            layout = extra.get(side)
            if layout is None:
                continue
            if not isinstance(layout, dict) or set(layout) - _LAYOUT_KEYS:
                raise ConfigError(f"{name}: kv_connector_extra_config.{side} must be an object of dp_size, tp_size")
            want = {"dp_size": par.data_parallel_size, "tp_size": par.tensor_parallel_size}
            for key, value in layout.items():
                if side == mine and value != want[key]:
                    raise ConfigError(f"{name}: kv_connector_extra_config.{side}.{key} is {value} but this "
                                      f"{side} server has {want[key]}")
        tps = [extra[side]["tp_size"] for side in ("prefill", "decode") if "tp_size" in extra.get(side, {})]
        if len(tps) == 2 and tps[0] != tps[1]:
            raise ConfigError(f"{name}: prefill tp_size {tps[0]} and decode tp_size {tps[1]} differ; pull_blocks "
                              f"moves whole blocks, so both sides need the same tensor parallel size")

    def __init__(self, config, engine, role, dp_rank: int = 0, tp_rank: int = 0):
        super().__init__(config, engine, role, dp_rank, tp_rank)
        self.ip = local_ip()
        self.listen = os.environ.get("VLLM_ASCEND_LLMDD_RPC_IP", "0.0.0.0")
        self.port = int(os.environ.get("VLLM_ASCEND_LLMDD_RPC_PORT", "5557")) + dp_rank * self.tp_size + tp_rank
        self.auth = side_channel.channel_auth(engine.parallel, "LLMDataDistCMgrConnector")
        self.held = HeldBlocks(self.timeout)
        self.lock = threading.Lock()
        self.linked: dict[int, int] = {}            # remote cluster id -> comm id
        self.received: set[str] = set()
        self.failed: set[str] = set()
        self.pending = 0                            # pulls submitted and not ended
        self.datadist = None

    def endpoint(self) -> tuple[str, int]:
        return self.ip, self.port

    def transfer_params(self, req) -> dict:
        return {"remote_tp_size": str(self.tp_size), "remote_pcp_size": "1", "remote_dcp_size": "1"}

    @staticmethod
    def remote_tp_size(p, req) -> int:
        return int(req.kv_transfer_params.get("remote_tp_size") or p.tp_size or 1)

    # -- worker side ---------------------------------------------------------------------
    def _my_device(self, table: dict, npu_index: int) -> dict:
        role_list = "prefill_device_list" if self.config.is_producer else "decode_device_list"
        visible = [v for v in os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "").split(",") if v]
        here = [d for d in table[role_list] if d["server_id"] == self.ip and (not visible or d["device_id"] in visible)]
        if npu_index >= len(here):
            raise ConfigError(f"LLMDataDistCMgrConnector: the ranktable's {role_list} has {len(here)} device(s) of "
                              f"server {self.ip}; this worker is NPU {npu_index}")
        return {k: v for k, v in here[npu_index].items()}

    def register_kv_caches(self, kv_caches: list[tuple]) -> None:
        import torch
        dd = load_llm_datadist()
        self.dd = dd
        k = kv_caches[0][0]
        npu = torch.npu.current_device()                # the platform set this worker's device
        self.device = self._my_device(ranktable.load(os.environ[RANKTABLE_ENV]), npu)
        self.cluster_id = int(self.device["cluster_id"])
        role = dd.LLMRole.PROMPT if self.config.is_producer else dd.LLMRole.DECODER
        self.datadist = dd.LLMDataDist(role, self.cluster_id)
        options = dd.LLMConfig()
        options.device_id = npu
        options.sync_kv_timeout = int(float(os.environ.get("EPPLAT_LLMDD_SYNC_KV_TIMEOUT_S", "20")) * 1000)
        options.enable_switch_role = True
        options.enable_cache_manager = True
        options.enable_remote_cache_accessible = True
        self.datadist.init(options.generate_options())
        tensors = [t for kv in kv_caches for t in kv]
        desc = dd.CacheDesc(len(tensors), list(k.shape), _datatype(dd, k.dtype))
        self.cache = self.datadist.cache_manager.register_blocks_cache(
            desc, [t.data_ptr() for t in tensors], dd.BlocksCacheKey(self.cluster_id, 0))
        self.my_compat = compat(self.engine, kv_caches)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="llmdd-pull")
        self.server = side_channel.SideChannelServer(self.listen, self.port, self._answer, self.auth)
        if self.tp_size > 1:
            self.tp = TPReports.of(self.engine, self.dp_rank, self.tp_rank, self.auth)
        logger.info("LLMDataDistCMgrConnector: DP rank %d TP rank %d is cluster %d (device %s, %s) with its side "
                    "channel at %s:%d", self.dp_rank, self.tp_rank, self.cluster_id, self.device["device_id"],
                    self.device["device_ip"], self.ip, self.port)

    def _link(self, peer: dict) -> int:
        """Link this device with the peer's (both sides do; usable once both have)."""
        cluster = int(peer["cluster_id"])
        with self.lock:
            if cluster in self.linked:
                return self.linked[cluster]
            prefill, decode = (self.device, peer) if self.config.is_producer else (peer, self.device)

            def entry(d, rank):
                return {"device_id": d["device_id"], "device_ip": d["device_ip"], "rank_id": rank,
                        **({"super_device_id": d["super_device_id"]} if "super_device_id" in d else {})}
            if prefill["server_id"] == decode["server_id"]:
                servers = [{"server_id": prefill["server_id"], "device": [entry(prefill, "0"), entry(decode, "1")]}]
            else:
                servers = [{"server_id": prefill["server_id"], "device": [entry(prefill, "0")]},
                           {"server_id": decode["server_id"], "device": [entry(decode, "1")]}]
            table = {"version": "1.2", "server_count": str(len(servers)), "status": "completed",
                     "server_list": servers}
            if "super_pod_id" in prefill:
                pods: dict = {}
                for d in (prefill, decode):
                    pods.setdefault(d["super_pod_id"], [])
                    if {"server_id": d["server_id"]} not in pods[d["super_pod_id"]]:
                        pods[d["super_pod_id"]].append({"server_id": d["server_id"]})
                table["super_pod_list"] = [{"super_pod_id": p, "server_list": s} for p, s in pods.items()]
            comm = self.datadist.link(f"pd_comm_{prefill['device_ip']}_{decode['device_ip']}",
                                      {int(prefill["cluster_id"]): 0, int(decode["cluster_id"]): 1}, json.dumps(table))
            self.linked[cluster] = comm
            return comm

    def _answer(self, msg: dict) -> dict:
        """The side channel: device metadata (and link), leases, finished reads."""
        op = msg.get("op")
        if op == "metadata":
            why = compat_error(self.my_compat, msg.get("compat") or {})
            if why:
                return {"error": why}
            try:
                self._link(msg["device"])
            except (KeyError, TypeError, ValueError, self.dd.LLMException) as e:
                return {"error": f"cannot link with that device: {e}"}
            return {"device": self.device, "compat": self.my_compat}
        if op == "lease":
            why = self.held.lease(msg.get("request_id"), msg.get("readers", 1))
            return {"error": why} if why else {"ok": True}
        if op == "finished":
            self.held.read(msg.get("request_id"))
            return {"ok": True}
        return {"error": "unknown op"}

    def _pull(self, pull: Pull) -> None:
        dd, where = self.dd, (pull.remote_host, pull.remote_port + self.tp_rank)    # the same TP rank there
        try:
            if pull.remote_tp_size != self.tp_size:
                raise RuntimeError(f"the prefill side has tensor parallel size {pull.remote_tp_size}, this side "
                                   f"{self.tp_size}; pull_blocks moves whole blocks, so both need the same")
            r = side_channel.request(*where, {"op": "metadata", "device": self.device, "compat": self.my_compat},
                                     self.auth)
            if "error" in r:
                raise RuntimeError(f"refused: {r['error']}")
            comm = self._link(r["device"])
            deadline = time.monotonic() + 30
            while (status := self.datadist.query_register_mem_status(comm)) != dd.RegisterMemStatus.OK:
                if status == dd.RegisterMemStatus.FAILED or time.monotonic() > deadline:
                    with self.lock:
                        self.linked.pop(int(r["device"]["cluster_id"]), None)
                    raise RuntimeError(f"the link with cluster {r['device']['cluster_id']} is {status.name}")
                time.sleep(0.01)
            r = side_channel.request(*where, {"op": "lease", "request_id": pull.remote_request_id}, self.auth)
            if "error" in r:
                raise RuntimeError(r["error"])
            self.datadist.cache_manager.pull_blocks(dd.BlocksCacheKey(int(self.linked_cluster(comm)), 0), self.cache,
                                                    pull.remote_blocks, pull.local_blocks)
            side_channel.request(*where, {"op": "finished", "request_id": pull.remote_request_id}, self.auth)
        except (OSError, RuntimeError, ValueError, KeyError, dd.LLMException) as e:
            logger.warning("LLMDataDistCMgrConnector: request %s: KV from %s:%d unavailable (%s); computing its "
                           "prompt here instead", pull.request_id, *where, e)
            with self.lock:
                self.failed.add(pull.request_id)
                self.pending -= 1
            return
        with self.lock:
            self.received.add(pull.request_id)
            self.pending -= 1

    def linked_cluster(self, comm: int) -> int:
        with self.lock:
            return next(c for c, i in self.linked.items() if i == comm)

    def start_load_kv(self, meta) -> None:
        self.held.update(meta)
        for pull in meta.pulls:
            with self.lock:
                self.pending += 1
            self.executor.submit(self._pull, pull)

    def busy(self) -> bool:
        with self.lock:
            return bool(self.pending or self.received or self.failed) or self.held.pending()

    def get_finished(self) -> tuple[set[str], set[str]]:
        with self.lock:
            received, self.received = self.received, set()
            failed, self.failed = self.failed, set()
        sent = self.held.freeable()
        if self.tp is not None:
            received, failed, sent = self.tp.collect(received, failed, sent)
        self.failed_out |= failed
        return sent, received

    def shutdown(self) -> None:
        super().shutdown()
        if self.datadist is not None:
            for comm in list(self.linked.values()):
                try:
                    self.datadist.unlink(comm)
                except self.dd.LLMException as e:
                    logger.warning("LLMDataDistCMgrConnector: unlink: %s", e)
            self.datadist.finalize()
