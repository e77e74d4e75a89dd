"""The flow shared by the connectors whose decode side pulls the blocks a prefill instance holds
(NixlConnector, the ascend plugin's LLMDataDistCMgrConnector): the scheduler side of both, the
prefill side's book of held blocks, and the compatibility both sides must share.

Prefill (kv_producer / kv_both): a request sent with ``kv_transfer_params.do_remote_decode`` keeps
its blocks when it finishes and answers with vLLM's fields (remote_engine_id, remote_block_ids,
remote_host, remote_port, remote_request_id, plus the connector's own) and
``remote_prompt_token_ids``, so the decode side continues that prompt whatever placeholder text it
is sent. The blocks are freed when every reader reports it has read them, or after
VLLM_NIXL_ABORT_REQUEST_TIMEOUT seconds (480) without that.

Decode (kv_consumer / kv_both): a request with ``do_remote_prefill`` counts the prompt (but its last
token, computed here to sample from) as loadable asynchronously; after its blocks are allocated the
workers pull only the blocks it lacks (the tail, when a prefix was cached here).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import threading
import time
from typing import Optional

import msgspec

from epplat.connectors.base import KVConnectorBase, KVConnectorMetadata, KVTransferParams
from epplat.connectors.tp_ranks import total_layers

logger = logging.getLogger(__name__)


def env(name: str, default: str) -> str:
    """EPPLAT_<name>, else vLLM's VLLM_<name>, else default."""
    return os.environ.get(f"EPPLAT_{name}") or os.environ.get(f"VLLM_{name}") or default


class Pull(msgspec.Struct, array_like=True):
    request_id: str
    local_blocks: list[int]
    remote_blocks: list[int]
    remote_request_id: str
    remote_engine_id: str
    remote_host: str
    remote_port: int
    remote_tp_size: int = 1


class PullMetadata(KVConnectorMetadata):
    pulls: list[Pull] = []
    holds: list[str] = []          # prefill: request ids whose blocks are now held for a reader
    releases: list[str] = []       # prefill: held request ids no reader will come for (their clients left)


def compat(engine, kv_caches: list[tuple]) -> dict:
    """What both sides must share: the model, the dtype and the KV layout (heads over the whole model)."""
    hf = dict(engine.model.hf_config())
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        hf.pop(key, None)
    k = kv_caches[0][0]
    return {"model": hashlib.sha256(json.dumps(hf, sort_keys=True, default=str).encode()).hexdigest()[:16],
            "dtype": str(k.dtype).removeprefix("torch."), "num_layers": total_layers(engine, len(kv_caches)),
            "block_size": engine.cache.block_size, "kv_heads": total_kv_heads(engine, k.shape[2]),
            "head_dim": k.shape[3], "layout": "block,token,head,dim"}


def total_kv_heads(engine, local_heads: int) -> int:
    hf = engine.model.hf_config()
    return int(hf.get("num_key_value_heads") or hf.get("num_attention_heads") or local_heads)


def compat_error(mine: dict, theirs: dict) -> Optional[str]:
    diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
    if not diff:
        return None
    return "different " + ", ".join(f"{k} (here {mine.get(k)}, there {theirs.get(k)})" for k in diff)


class HeldBlocks:
    """The prefill side's finished requests whose blocks wait for their readers (thread-safe: the side
    channel's threads lease and release, the engine's loop collects what may be freed)."""

    LEASE_WAIT_S = 2.0      # a lease may come before the engine loop has recorded the hold of a just-finished request
    GONE_KEPT = 4096        # freed request ids remembered, so that a late lease for one is refused at once

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.lock = threading.Condition()
        self.deadline: dict[str, float] = {}
        self.readers: dict[str, int] = {}        # request id -> reads still to report (once leased)
        self.done: set[str] = set()
        self.gone: collections.OrderedDict = collections.OrderedDict()

    def hold(self, rids) -> None:
        deadline = time.monotonic() + self.timeout
        with self.lock:
            for rid in rids:
                self.deadline.setdefault(rid, deadline)
                self.gone.pop(rid, None)             # a request id used again (X-Request-Id)
            self.lock.notify_all()

    def update(self, meta: "PullMetadata") -> None:
        """A step's new holds, and the releases of held blocks no reader has leased."""
        self.hold(meta.holds)
        with self.lock:
            for rid in meta.releases:
                if rid in self.deadline and rid not in self.readers:
                    logger.info("freeing the blocks of request %s: its client left", rid)
                    self._drop(rid)

    def lease(self, rid, readers: int = 1) -> Optional[str]:
        """A reader is about to read rid's blocks (`readers` reads in all, one per decode TP rank); the
        error line when it holds none."""
        with self.lock:
            if rid in self.gone or not self.lock.wait_for(lambda: rid in self.deadline or rid in self.gone,
                                                          self.LEASE_WAIT_S) or rid not in self.deadline:
                return f"request {rid} holds no blocks here (finished reading, expired or unknown)"
            self.readers.setdefault(rid, max(1, int(readers)))
            self.deadline[rid] = time.monotonic() + self.timeout
        return None

    def read(self, rid) -> None:
        """One reader finished; the last one frees the blocks."""
        with self.lock:
            if rid not in self.deadline:
                return
            left = self.readers.get(rid, 1) - 1
            if left > 0:
                self.readers[rid] = left
                return
            self._drop(rid)

    def _drop(self, rid) -> None:
        self.deadline.pop(rid, None)
        self.readers.pop(rid, None)
        self.done.add(rid)
        self.gone[rid] = None
        if len(self.gone) > self.GONE_KEPT:
            self.gone.popitem(last=False)

    def pending(self) -> bool:
        """Whether blocks are held, or freed and not yet collected by freeable()."""
        with self.lock:
            return bool(self.deadline or self.done)

    def freeable(self) -> set[str]:
        now = time.monotonic()
        with self.lock:
            for rid, deadline in list(self.deadline.items()):
                if deadline < now:
                    logger.warning("freeing the blocks of request %s: no decoder read them in %.0f s", rid,
                                   self.timeout)
                    self._drop(rid)
            done, self.done = self.done, set()
        return done


class PullConnector(KVConnectorBase):
    """The scheduler side both pulling connectors share; subclasses give `endpoint()` (the host and
    port the decode side reaches this DP rank at) and the worker side."""

    metadata_type = PullMetadata

    def __init__(self, config, engine, role, dp_rank: int = 0, tp_rank: int = 0, pp_rank: int = 0):
        super().__init__(config, engine, role, dp_rank, tp_rank, pp_rank)
        self.engine_id = config.engine_id
        self.timeout = float(env("NIXL_ABORT_REQUEST_TIMEOUT", "480"))
        self.tp_size = engine.parallel.tensor_parallel_size
        self.pulls: list[Pull] = []
        self.holds: list[str] = []
        self.releases: list[str] = []
        self.loaded: set[str] = set()
        self.failed_out: set[str] = set()           # worker side: loads that failed, until asked
        self.server = self.tp = None                # worker side: the side channel, the TP ranks' reports

    def endpoint(self) -> tuple[str, int]:
        raise NotImplementedError

    def transfer_params(self, req) -> dict:
        """The connector's own keys in a finished prefill request's kv_transfer_params."""
        return {}

    @staticmethod
    def remote_tp_size(p: KVTransferParams, req) -> int:
        return int(p.tp_size or 1)

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
                               int(p.remote_port), self.remote_tp_size(p, req)))

    def build_connector_meta(self) -> PullMetadata:
        meta = PullMetadata(self.pulls, self.holds, self.releases)
        self.pulls, self.holds, self.releases = [], [], []
        return meta

    def release(self, request_id: str) -> None:
        self.releases.append(request_id)

    def request_finished(self, req) -> tuple[bool, Optional[dict]]:
        self.loaded.discard(req.request_id)
        p = self._params(req)
        if p is None or not p.do_remote_decode or not self.config.is_producer or req.finish_reason == "abort":
            return False, None
        self.holds.append(req.request_id)
        host, port = self.endpoint()
        return True, {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": list(req.block_table),
                      "remote_engine_id": self.engine_id, "remote_request_id": req.request_id,
                      "remote_host": host, "remote_port": port, **self.transfer_params(req),
                      "remote_prompt_token_ids": req.token_ids[:req.prompt_len]}

    def get_failed_loads(self) -> set[str]:
        failed, self.failed_out = self.failed_out, set()
        return failed

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.tp is not None:
            self.tp.close()
