"""NixlConnector (vLLM's name and flow) on the real `nixl` package: the decode side READs the KV
blocks a prefill instance computed, straight from the prefill process's KV cache (host memory on
the cpu platform, GPU memory on cuda), through NIXL's UCX backend.

Prefill (kv_producer / kv_both): a request sent with ``kv_transfer_params.do_remote_decode``
keeps its blocks when it finishes and answers with vLLM's fields (remote_engine_id,
remote_block_ids, remote_host, remote_port, remote_request_id, tp_size) plus
``remote_prompt_token_ids``, so the decode side continues that prompt whatever placeholder text it
is sent. The blocks are freed when the decode side's read completes (NIXL notifies the prefill
agent) or after VLLM_NIXL_ABORT_REQUEST_TIMEOUT seconds (480) without a read.

Decode (kv_consumer / kv_both): a request with ``do_remote_prefill`` counts the prompt (but its
last token, computed here to sample from) as loadable; after its blocks are allocated the worker
asks the prefill DP rank's side channel (VLLM_NIXL_SIDE_CHANNEL_HOST, VLLM_NIXL_SIDE_CHANNEL_PORT
+ DP rank) for its agent metadata once per engine (a handshake that refuses a different model,
dtype or KV layout), then for a lease on the request's blocks, and READs only the blocks it lacks
(the tail, when a prefix was cached here). Other requests keep stepping meanwhile. When the
prefill side is gone, refuses, or has freed the blocks, the request is recomputed here from the
prompt tokens it carries, with a warning.

Limits: one rank per DP rank on either side (tensor parallel size 1); the KV layouts must match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from typing import Optional

import msgspec

from epplat.config import ConfigError
from epplat.connectors import side_channel
from epplat.connectors.base import KVConnectorBase, KVConnectorMetadata, KVTransferParams

logger = logging.getLogger(__name__)


def _env(name: str, default: str) -> str:
    return os.environ.get(f"EPPLAT_{name}") or os.environ.get(f"VLLM_{name}") or default


class Pull(msgspec.Struct, array_like=True):
    request_id: str
    local_blocks: list[int]
    remote_blocks: list[int]
    remote_request_id: str
    remote_engine_id: str
    remote_host: str
    remote_port: int


class NixlMetadata(KVConnectorMetadata):
    pulls: list[Pull] = []
    holds: list[str] = []          # prefill: request ids whose blocks are now held for a reader


def load_nixl():
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError:
        raise ConfigError("NixlConnector needs the nixl package: pip install 'epplat[nixl]'") from None
    return nixl_agent, nixl_agent_config


class NixlConnector(KVConnectorBase):
    metadata_type = NixlMetadata

    @classmethod
    def check_config(cls, engine) -> None:
        if engine.parallel.tensor_parallel_size != 1:
            raise ConfigError("NixlConnector: --tensor-parallel-size above 1 is not supported yet "
                              "(each DP rank of either side is one rank)")

    def __init__(self, config, engine, role, dp_rank: int = 0, tp_rank: int = 0):
        super().__init__(config, engine, role, dp_rank, tp_rank)
        self.engine_id = config.engine_id
        self.host = _env("NIXL_SIDE_CHANNEL_HOST", "127.0.0.1")
        self.port = int(_env("NIXL_SIDE_CHANNEL_PORT", "5600")) + dp_rank
        self.timeout = float(_env("NIXL_ABORT_REQUEST_TIMEOUT", "480"))
        # scheduler side
        self.pulls: list[Pull] = []
        self.holds: list[str] = []
        self.loaded: set[str] = set()
        # worker side
        self.agent = None
        self.lock = threading.Lock()
        self.held: dict[str, float] = {}        # request id -> deadline (inf once a reader holds a lease)
        self.remote: dict[tuple[str, int], tuple[str, list, int]] = {}   # (host, port) -> agent, bases, block bytes
        self.inflight: dict[str, tuple[object, str]] = {}
        self.failed: set[str] = set()
        self.server = None

    # -- scheduler side ------------------------------------------------------------------
    @staticmethod
    def _params(req) -> Optional[KVTransferParams]:
        p = req.kv_transfer_params
        return msgspec.convert(p, KVTransferParams) if p else None

    def get_num_new_matched_tokens(self, req, num_computed_tokens: int) -> tuple[int, bool]:
        p = self._params(req)
        if (p is None or not p.do_remote_prefill or not self.config.is_consumer or req.request_id in self.loaded
                or not p.remote_block_ids or p.remote_host is None or p.remote_port is None):
            return 0, False
        remote_tokens = min(req.num_tokens, len(p.remote_block_ids) * self.block_size)
        return max(0, remote_tokens - 1 - num_computed_tokens), True

    def update_state_after_alloc(self, req, num_external_tokens: int) -> None:
        if not num_external_tokens:
            return
        p = self._params(req)
        first = req.num_computed // self.block_size
        last = -(-(req.num_computed + num_external_tokens) // self.block_size)
        self.loaded.add(req.request_id)
        self.pulls.append(Pull(req.request_id, req.block_table[first:last], p.remote_block_ids[first:last],
                               p.remote_request_id or req.request_id, p.remote_engine_id or "", p.remote_host,
                               p.remote_port))

    def build_connector_meta(self) -> NixlMetadata:
        meta = NixlMetadata(self.pulls, self.holds)
        self.pulls, self.holds = [], []
        return meta

    def request_finished(self, req) -> tuple[bool, Optional[dict]]:
        self.loaded.discard(req.request_id)
        p = self._params(req)
        if p is None or not p.do_remote_decode or not self.config.is_producer or req.finish_reason == "abort":
            return False, None
        self.holds.append(req.request_id)
        return True, {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": list(req.block_table),
                      "remote_engine_id": self.engine_id, "remote_request_id": req.request_id,
                      "remote_host": self.host, "remote_port": self.port, "tp_size": 1,
                      "remote_prompt_token_ids": req.token_ids[:req.prompt_len]}

    # -- worker side ---------------------------------------------------------------------
    def compat(self) -> dict:
        """What both sides must share: the model, the dtype and the KV layout."""
        hf = dict(self.engine.model.hf_config())
        for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            hf.pop(key, None)
        k = self.kv_caches[0][0]
        return {"model": hashlib.sha256(json.dumps(hf, sort_keys=True, default=str).encode()).hexdigest()[:16],
                "dtype": str(k.dtype).removeprefix("torch."), "num_layers": len(self.kv_caches),
                "block_size": self.block_size, "kv_heads": k.shape[2], "head_dim": k.shape[3],
                "layout": "block,token,head,dim"}

    def register_kv_caches(self, kv_caches: list[tuple]) -> None:
        nixl_agent, nixl_agent_config = load_nixl()
        self.kv_caches = kv_caches
        k = kv_caches[0][0]
        self.mem = "VRAM" if k.device.type == "cuda" else "DRAM"
        self.dev = k.device.index or 0
        self.block_bytes = k[0].numel() * k.element_size()
        backends = self.config.kv_connector_extra_config.get("backends", ["UCX"])
        self.agent_name = f"{self.engine_id}-dp{self.dp_rank}"
        self.agent = nixl_agent(self.agent_name, nixl_agent_config(backends=list(backends)))
        tensors = [t for kv in kv_caches for t in kv]
        self.reg = self.agent.register_memory([(t.data_ptr(), t.numel() * t.element_size(), self.dev, "")
                                               for t in tensors], self.mem)
        self.bases = [t.data_ptr() for t in tensors]
        self.my_compat = self.compat()
        if self.config.is_producer:
            self.server = side_channel.SideChannelServer(self.host, self.port, self._answer)
            logger.info("NixlConnector: DP rank %d serves its KV blocks at %s:%d (agent %s)", self.dp_rank, self.host,
                        self.port, self.agent_name)

    def _answer(self, msg: dict) -> dict:
        """The prefill side's side channel: handshakes and leases."""
        if msg.get("op") == "handshake":
            theirs = msg.get("compat") or {}
            diff = sorted(k for k in set(theirs) | set(self.my_compat) if theirs.get(k) != self.my_compat.get(k))
            if diff:
                return {"error": "different " + ", ".join(f"{k} (here {self.my_compat.get(k)}, there {theirs.get(k)})"
                                                          for k in diff)}
            return {"agent": self.agent.get_agent_metadata(), "bases": self.bases, "block_bytes": self.block_bytes,
                    "engine_id": self.engine_id, "compat": self.my_compat}
        if msg.get("op") == "lease":
            rid = msg.get("request_id")
            with self.lock:
                if rid not in self.held:
                    return {"error": f"request {rid} holds no blocks here (finished reading, expired or unknown)"}
                self.held[rid] = float("inf")       # a reader has it: freed when its read completes
            return {"ok": True}
        return {"error": "unknown op"}

    def _handshake(self, host: str, port: int) -> tuple[str, list, int]:
        key = (host, port)
        if key not in self.remote:
            r = side_channel.request(host, port, {"op": "handshake", "compat": self.my_compat})
            if "error" in r:
                raise RuntimeError(f"NixlConnector handshake with {host}:{port} refused: {r['error']}")
            name = self.agent.add_remote_agent(r["agent"])
            self.remote[key] = (name, r["bases"], r["block_bytes"])
        return self.remote[key]

    def start_load_kv(self, meta: NixlMetadata) -> None:
        if meta.holds:
            deadline = time.monotonic() + self.timeout
            with self.lock:
                for rid in meta.holds:
                    self.held.setdefault(rid, deadline)
        for pull in meta.pulls:
            try:
                name, bases, block_bytes = self._handshake(pull.remote_host, pull.remote_port)
                if block_bytes != self.block_bytes:
                    raise RuntimeError("block sizes differ")
                r = side_channel.request(pull.remote_host, pull.remote_port,
                                         {"op": "lease", "request_id": pull.remote_request_id})
                if "error" in r:
                    raise RuntimeError(r["error"])
                local = [(base + b * self.block_bytes, self.block_bytes, self.dev)
                         for base in self.bases for b in pull.local_blocks]
                remote = [(base + b * block_bytes, block_bytes, 0) for base in bases for b in pull.remote_blocks]
                handle = self.agent.initialize_xfer("READ", self.agent.get_xfer_descs(local, self.mem),
                                                    self.agent.get_xfer_descs(remote, self.mem), name,
                                                    pull.remote_request_id.encode())
                if self.agent.transfer(handle) == "ERR":
                    raise RuntimeError("transfer did not start")
                self.inflight[pull.request_id] = (handle, f"{pull.remote_host}:{pull.remote_port}")
            except (OSError, RuntimeError, ValueError, KeyError) as e:
                logger.warning("NixlConnector: request %s: KV from %s:%d unavailable (%s); computing its prompt "
                               "here instead", pull.request_id, pull.remote_host, pull.remote_port, e)
                self.failed.add(pull.request_id)

    def get_finished(self) -> tuple[set[str], set[str]]:
        sent, received = set(), set()
        if self.agent is None:
            return sent, received
        for msgs in self.agent.get_new_notifs().values():
            sent.update(m.decode() for m in msgs)
        now = time.monotonic()
        with self.lock:
            for rid in sent:
                self.held.pop(rid, None)
            for rid, deadline in list(self.held.items()):
                if deadline < now:
                    logger.warning("NixlConnector: freeing the blocks of request %s: no decoder read them in %.0f s",
                                   rid, self.timeout)
                    del self.held[rid]
                    sent.add(rid)
        for rid, (handle, where) in list(self.inflight.items()):
            state = self.agent.check_xfer_state(handle)
            if state == "PROC":
                continue
            del self.inflight[rid]
            self.agent.release_xfer_handle(handle)
            if state == "DONE":
                received.add(rid)
            else:
                logger.warning("NixlConnector: request %s: the read from %s failed; computing its prompt here", rid,
                               where)
                self.failed.add(rid)
        return sent, received

    def get_failed_loads(self) -> set[str]:
        failed, self.failed = self.failed, set()
        return failed

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
