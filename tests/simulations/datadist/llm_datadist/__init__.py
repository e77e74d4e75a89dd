"""SIMULATION of CANN's ``llm_datadist`` (tests only): the names epplat's LLMDataDistCMgrConnector calls,
with the bytes moved for real between processes.

On Ascend, LLMDataDist links a prefill and a decode device over HCCL and the decode side pulls KV blocks
straight out of the prefill device's registered cache. Here the "devices" are processes and the
"fabric" is TCP on loopback: every initialised LLMDataDist listens on a port it writes to
``$SIM_LLM_DATADIST_FABRIC/cluster-<cluster_id>`` (the test makes that folder); ``pull_blocks`` asks
the remote cluster's listener for the blocks, which reads them from the registered addresses of its
process and sends them; the puller writes them to its own registered addresses. No pickle: the
wire is length-prefixed msgpack.

As strict as the documented API (llm_datadist's Python API reference, CANN 8.x, and vllm-ascend's
use of it): ``init`` once, with options from ``LLMConfig.generate_options()``; ``cache_manager`` only
with ``enable_cache_manager``; ``register_blocks_cache`` needs one address per tensor and this
cluster's key; ``link`` needs a version-1.2 ranktable listing both devices with the ranks of
``cluster_rank_info``, and is usable once both sides linked the same comm name
(``query_register_mem_status`` says PREPARING until then); ``pull_blocks`` needs an OK link to the
remote cluster, equal block lists, block ids in range, and the same cache shape (but the block
count) and data type on both sides. Failures raise ``LLMException`` with a status code.
"""

from __future__ import annotations

import ctypes
import enum
import json
import math
import os
import socket
import socketserver
import struct
import threading
from pathlib import Path

import msgspec

calls: list[str] = []          # what the product called, in order (for tests in this process)


LLMRole = enum.Enum("LLMRole", {"PROMPT": 1, "DECODER": 2, "MIX": 3})
DataType = enum.Enum("DataType", {"DT_FLOAT": 0, "DT_FLOAT16": 1, "DT_INT8": 2, "DT_INT32": 3, "DT_INT64": 9,
                                  "DT_BF16": 27})
_DT_BYTES = {DataType.DT_FLOAT: 4, DataType.DT_FLOAT16: 2, DataType.DT_INT8: 1, DataType.DT_INT32: 4,
             DataType.DT_INT64: 8, DataType.DT_BF16: 2}
RegisterMemStatus = enum.Enum("RegisterMemStatus", {"OK": 0, "PREPARING": 1, "FAILED": 2})
LLMStatusCode = enum.Enum("LLMStatusCode", {"LLM_SUCCESS": 0, "LLM_PARAM_INVALID": 1, "LLM_TIMEOUT": 2,
                                            "LLM_LINK_FAILED": 3, "LLM_NOT_YET_LINK": 4, "LLM_ALREADY_LINK": 5,
                                            "LLM_FEATURE_NOT_ENABLED": 6, "LLM_REPEAT_REQUEST": 7})


class LLMException(Exception):
    def __init__(self, msg: str, status_code: LLMStatusCode = LLMStatusCode.LLM_PARAM_INVALID):
        super().__init__(f"{status_code.name}: {msg}")
        self.status_code = status_code


class LLMConfig:
    _FIELDS = {"device_id": "llm.DeviceId", "sync_kv_timeout": "llm.SyncKvCacheWaitTime",
               "enable_switch_role": "llm.EnableSwitchRole", "enable_cache_manager": "llm.EnableCacheManager",
               "enable_remote_cache_accessible": "llm.EnableRemoteCacheAccessible",
               "listen_ip_info": "llm.ListenIpInfo", "mem_pool_cfg": "llm.MemPoolConfig"}

    def __setattr__(self, name, value):
        if name not in self._FIELDS:
            raise AttributeError(f"LLMConfig has no option {name!r}")
        object.__setattr__(self, name, value)

    def generate_options(self) -> dict:
        return {self._FIELDS[k]: str(v) if not isinstance(v, bool) else ("1" if v else "0")
                for k, v in self.__dict__.items()}


class CacheDesc:
    def __init__(self, num_tensors: int, shape: list, data_type: DataType, placement=None):
        if not isinstance(data_type, DataType):
            raise LLMException(f"data_type must be a DataType, not {data_type!r}")
        self.num_tensors, self.shape, self.data_type = int(num_tensors), [int(s) for s in shape], data_type

    def block_bytes(self) -> int:
        return math.prod(self.shape[1:]) * _DT_BYTES[self.data_type]


class BlocksCacheKey:
    def __init__(self, cluster_id: int, model_id: int = 0):
        self.cluster_id, self.model_id = int(cluster_id), int(model_id)


class Cache:
    def __init__(self, cache_id: int, desc: CacheDesc, addrs: list[int]):
        self.cache_id, self.cache_desc, self.per_device_tensor_addrs = cache_id, desc, list(addrs)


# -- the wire --------------------------------------------------------------------------------------------
def _send(sock, obj) -> None:
    data = msgspec.msgpack.encode(obj)
    sock.sendall(struct.pack(">Q", len(data)) + data)


def _recv(sock):
    def exact(n):
        buf = bytearray()
        while len(buf) < n:
            part = sock.recv(min(n - len(buf), 1 << 20))
            if not part:
                raise ConnectionError("the remote device's link closed")
            buf += part
        return bytes(buf)
    (n,) = struct.unpack(">Q", exact(8))
    return msgspec.msgpack.decode(exact(n))


def _fabric() -> Path:
    where = os.environ.get("SIM_LLM_DATADIST_FABRIC")
    if not where or not Path(where).is_dir():
        raise LLMException("simulation: SIM_LLM_DATADIST_FABRIC must name an existing folder",
                           LLMStatusCode.LLM_FEATURE_NOT_ENABLED)
    return Path(where)


class CacheManager:
    def __init__(self, owner: "LLMDataDist"):
        self.owner = owner
        self.caches: dict[int, Cache] = {}
        self.keys: dict[int, Cache] = {}     # model_id -> the cache registered under this cluster's key

    def register_blocks_cache(self, cache_desc: CacheDesc, addrs: list[int], cache_key: BlocksCacheKey) -> Cache:
        calls.append("register_blocks_cache")
        if len(addrs) != cache_desc.num_tensors:
            raise LLMException(f"{len(addrs)} addresses for {cache_desc.num_tensors} tensors")
        if cache_key.cluster_id != self.owner.cluster_id:
            raise LLMException(f"cache key of cluster {cache_key.cluster_id} registered by cluster "
                               f"{self.owner.cluster_id}")
        if cache_key.model_id in self.keys:
            raise LLMException(f"a cache is registered for model_id {cache_key.model_id} already",
                               LLMStatusCode.LLM_REPEAT_REQUEST)
        cache = Cache(len(self.caches) + 1, cache_desc, addrs)
        self.caches[cache.cache_id] = cache
        self.keys[cache_key.model_id] = cache
        return cache

    def unregister_cache(self, cache_id: int) -> None:
        cache = self.caches.pop(cache_id)
        self.keys = {m: c for m, c in self.keys.items() if c is not cache}

    def pull_blocks(self, src_cache_key: BlocksCacheKey, dst_cache: Cache, src_blocks: list[int],
                    dst_blocks: list[int]) -> None:
        calls.append("pull_blocks")
        dd = self.owner
        if dst_cache.cache_id not in self.caches:
            raise LLMException("dst_cache is not registered here")
        if len(src_blocks) != len(dst_blocks):
            raise LLMException(f"{len(src_blocks)} source and {len(dst_blocks)} destination blocks")
        desc = dst_cache.cache_desc
        if any(not 0 <= b < desc.shape[0] for b in dst_blocks):
            raise LLMException(f"destination block ids out of range [0, {desc.shape[0]})")
        comm = dd.comm_to(src_cache_key.cluster_id)
        if comm is None or dd.query_register_mem_status(comm) is not RegisterMemStatus.OK:
            raise LLMException(f"no link with cluster {src_cache_key.cluster_id}", LLMStatusCode.LLM_NOT_YET_LINK)
        answer = dd.ask(src_cache_key.cluster_id, {"op": "read", "model_id": src_cache_key.model_id,
                                                   "blocks": list(src_blocks), "from": dd.cluster_id})
        if "error" in answer:
            raise LLMException(answer["error"], LLMStatusCode(answer.get("code", 1)))
        if answer["shape"][1:] != desc.shape[1:] or answer["dtype"] != desc.data_type.name or \
                answer["num_tensors"] != desc.num_tensors:
            raise LLMException(f"remote cache {answer['num_tensors']} x {answer['shape']} {answer['dtype']} does not "
                               f"match local {desc.num_tensors} x {desc.shape} {desc.data_type.name}")
        data, n = answer["data"], desc.block_bytes()
        pos = 0
        for addr in dst_cache.per_device_tensor_addrs:
            for b in dst_blocks:
                ctypes.memmove(addr + b * n, data[pos:pos + n], n)
                pos += n


class LLMDataDist:
    def __init__(self, role: LLMRole, cluster_id: int):
        if not isinstance(role, LLMRole):
            raise LLMException(f"role must be an LLMRole, not {role!r}")
        self.role, self.cluster_id = role, int(cluster_id)
        self.options: dict | None = None
        self._cache_manager: CacheManager | None = None
        self.comms: dict[int, dict] = {}           # comm id -> {name, peer}
        self.peer_links: set[str] = set()          # comm names the peers linked with us
        self.lock = threading.Lock()

    def init(self, options: dict) -> None:
        calls.append("init")
        if self.options is not None:
            raise LLMException("init called twice", LLMStatusCode.LLM_REPEAT_REQUEST)
        if "llm.DeviceId" not in options:
            raise LLMException("options lack llm.DeviceId")
        self.options = dict(options)
        self.timeout = int(options.get("llm.SyncKvCacheWaitTime", "1000")) / 1000
        if options.get("llm.EnableCacheManager") == "1":
            self._cache_manager = CacheManager(self)
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                owner._answer(self.request)
        self.fabric = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.fabric.daemon_threads = True
        (_fabric() / f"cluster-{self.cluster_id}").write_text(str(self.fabric.server_address[1]))
        threading.Thread(target=self.fabric.serve_forever, daemon=True, name="sim-llm-datadist").start()

    @property
    def cache_manager(self) -> CacheManager:
        if self._cache_manager is None:
            raise LLMException("the cache manager needs init with enable_cache_manager",
                               LLMStatusCode.LLM_FEATURE_NOT_ENABLED)
        return self._cache_manager

    # -- links ---------------------------------------------------------------------------------------------
    def link(self, comm_name: str, cluster_rank_info: dict, rank_table: str) -> int:
        calls.append("link")
        if self.options is None:
            raise LLMException("link before init")
        ranks = {int(k): int(v) for k, v in cluster_rank_info.items()}
        if self.cluster_id not in ranks or len(ranks) != 2 or sorted(ranks.values()) != [0, 1]:
            raise LLMException(f"cluster_rank_info {cluster_rank_info} must map this cluster and one peer to 0 and 1")
        try:
            table = json.loads(rank_table)
        except (TypeError, ValueError):
            raise LLMException("rank_table is not JSON") from None
        devices = [d for s in table.get("server_list", []) for d in s.get("device", [])]
        if table.get("version") != "1.2" or table.get("status") != "completed" or \
                sorted(d.get("rank_id") for d in devices) != ["0", "1"] or \
                int(table.get("server_count", 0)) != len(table["server_list"]):
            raise LLMException(f"rank_table is not a version 1.2 table of the two linked devices: {rank_table}")
        if any(c["name"] == comm_name for c in self.comms.values()):
            raise LLMException(f"{comm_name} is linked already", LLMStatusCode.LLM_ALREADY_LINK)
        peer = next(c for c in ranks if c != self.cluster_id)
        comm_id = len(self.comms) + 1
        self.comms[comm_id] = {"name": comm_name, "peer": peer}
        try:
            self.ask(peer, {"op": "link", "name": comm_name})
        except LLMException:
            self.comms[comm_id]["failed"] = True
        return comm_id

    def query_register_mem_status(self, comm_id: int) -> RegisterMemStatus:
        comm = self.comms.get(comm_id)
        if comm is None or comm.get("failed"):
            return RegisterMemStatus.FAILED
        with self.lock:
            return RegisterMemStatus.OK if comm["name"] in self.peer_links else RegisterMemStatus.PREPARING

    def unlink(self, comm_id: int) -> None:
        calls.append("unlink")
        if self.comms.pop(comm_id, None) is None:
            raise LLMException(f"no comm {comm_id}", LLMStatusCode.LLM_NOT_YET_LINK)

    def comm_to(self, cluster_id: int):
        return next((i for i, c in self.comms.items() if c["peer"] == cluster_id), None)

    def finalize(self) -> None:
        calls.append("finalize")
        if self.options is not None:
            self.fabric.shutdown()
            self.fabric.server_close()

    # -- the fabric ----------------------------------------------------------------------------------------
    def ask(self, cluster_id: int, msg: dict) -> dict:
        try:
            port = int((_fabric() / f"cluster-{cluster_id}").read_text())
            with socket.create_connection(("127.0.0.1", port), timeout=self.timeout) as s:
                _send(s, msg)
                return _recv(s)
        except (OSError, ValueError, ConnectionError) as e:
            raise LLMException(f"cluster {cluster_id} unreachable: {e}", LLMStatusCode.LLM_LINK_FAILED) from None

    def _answer(self, conn) -> None:
        try:
            msg = _recv(conn)
            if msg["op"] == "link":
                with self.lock:
                    self.peer_links.add(msg["name"])
                _send(conn, {"ok": True})
            elif msg["op"] == "read":
                _send(conn, self._read(msg))
        except (OSError, ConnectionError, KeyError):
            pass

    def _read(self, msg) -> dict:
        if self.options.get("llm.EnableRemoteCacheAccessible") != "1":
            return {"error": "remote cache access is not enabled on the source", "code": 6}
        if self.comm_to(msg["from"]) is None:
            return {"error": f"cluster {msg['from']} is not linked with the source", "code": 4}
        cache = self._cache_manager.keys.get(msg["model_id"]) if self._cache_manager else None
        if cache is None:
            return {"error": f"no cache registered for model_id {msg['model_id']}", "code": 1}
        desc, n = cache.cache_desc, cache.cache_desc.block_bytes()
        if any(not 0 <= b < desc.shape[0] for b in msg["blocks"]):
            return {"error": f"source block ids out of range [0, {desc.shape[0]})", "code": 1}
        data = b"".join(ctypes.string_at(addr + b * n, n) for addr in cache.per_device_tensor_addrs
                        for b in msg["blocks"])
        return {"shape": desc.shape, "dtype": desc.data_type.name, "num_tensors": desc.num_tensors, "data": data}
