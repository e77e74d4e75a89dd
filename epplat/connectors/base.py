"""The KV connector contract: what the scheduler, the model runner and the engine core ask of a
connector (vLLM's KVConnectorBase_V1, smaller).

One connector class has two sides, built separately: the scheduler side (role SCHEDULER, in the
engine core next to the scheduler) decides which prompt tokens come from elsewhere and which
blocks to keep after a request finishes; the worker side (role WORKER, in every model runner,
TP workers included) moves the bytes. They talk only through the per-step metadata, a msgspec
struct the scheduler side builds and the workers receive encoded with the step (no pickle).

A request whose KV is loaded asynchronously waits outside the running batch (other requests keep
stepping) until the worker side reports it received; a finished request whose blocks the
connector holds keeps them until the worker side reports them sent.
"""

from __future__ import annotations

import enum
from typing import Optional

import msgspec


class KVConnectorRole(enum.Enum):
    SCHEDULER = 0
    WORKER = 1


class KVConnectorMetadata(msgspec.Struct):
    """One step's instructions from the scheduler side to the workers; connectors subclass it."""


class KVTransferParams(msgspec.Struct, omit_defaults=True):
    """`kv_transfer_params` of an OpenAI request or response, with vLLM's keys (NixlConnector's). Extra keys
    travel as they are; the typed ones must have these types (else the request is a 400)."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: Optional[str] = None
    remote_request_id: Optional[str] = None
    remote_block_ids: Optional[list[int]] = None
    remote_host: Optional[str] = None
    remote_port: Optional[int] = None
    tp_size: Optional[int] = None
    remote_prompt_token_ids: Optional[list[int]] = None    # epplat's: the prompt the prefill side computed


def check_kv_transfer_params(params) -> Optional[dict]:
    """The request's kv_transfer_params as a dict (None stays None); ValueError naming what is wrong."""
    if params is None:
        return None
    if not isinstance(params, dict):
        raise ValueError("kv_transfer_params must be an object")
    try:
        msgspec.convert(params, KVTransferParams)
    except msgspec.ValidationError as e:
        raise ValueError(f"kv_transfer_params: {e}") from None
    return params


class KVConnectorBase:
    """Base of every connector. `config` is the KVTransferConfig, `engine` the EngineConfig; the defaults
    do nothing, so a connector overrides only what it needs."""

    metadata_type: type[KVConnectorMetadata] = KVConnectorMetadata
    pipeline_stages = False     # whether its worker side serves a rank holding one pipeline stage's layers

    @classmethod
    def check_config(cls, engine) -> None:
        """Raise ConfigError when this connector cannot serve `engine` (checked before any engine starts)."""

    def __init__(self, config, engine, role: KVConnectorRole, dp_rank: int = 0, tp_rank: int = 0, pp_rank: int = 0):
        self.check_config(engine)
        self.config, self.engine, self.role = config, engine, role
        self.dp_rank, self.tp_rank, self.pp_rank = dp_rank, tp_rank, pp_rank
        self.local_rank = pp_rank * engine.parallel.tensor_parallel_size + tp_rank   # within the DP rank; 0: driver
        self.block_size = engine.cache.block_size

    # -- scheduler side ------------------------------------------------------------------
    def get_num_new_matched_tokens(self, req, num_computed_tokens: int) -> tuple[int, bool]:
        """How many prompt tokens after the num_computed_tokens found locally can be loaded from elsewhere,
        and whether they arrive asynchronously (the request then waits until the workers report it)."""
        return 0, False

    def update_state_after_alloc(self, req, num_external_tokens: int) -> None:
        """req's blocks (req.block_table) now exist, num_external_tokens of them to be loaded by the workers."""

    def build_connector_meta(self) -> KVConnectorMetadata:
        """This step's metadata for the workers (what to load, what to save); resets the scheduler side's
        per-step state."""
        return self.metadata_type()

    def request_finished(self, req) -> tuple[bool, Optional[dict]]:
        """req finished: (whether its blocks stay held until the workers report them sent, the
        kv_transfer_params for its response)."""
        return False, None

    def release(self, request_id: str) -> None:
        """A finished request's held blocks are no longer wanted (its client left): free them unless a
        reader has started on them (the workers then report them sent as usual)."""

    # -- worker side ---------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: list[tuple]) -> None:
        """The KV cache of every layer, (key, value) tensors of [num_blocks, block_size, kv_heads, head_dim]."""

    def start_load_kv(self, meta: KVConnectorMetadata) -> None:
        """Before the forward of a step: start (or, for a synchronous load, do) the loads in meta."""

    def save_kv(self, meta: KVConnectorMetadata) -> None:
        """After the forward of a step: the saves in meta (the keys and values of this step are in the cache)."""

    def get_finished(self) -> tuple[set[str], set[str]]:
        """(request ids whose held blocks are sent and may be freed, request ids whose loads completed).
        Only the driver's (TP rank 0's) answer is read: the other TP ranks' connectors, polled while
        ``busy``, report to it themselves."""
        return set(), set()

    def busy(self) -> bool:
        """Whether transfers of this worker are in flight (a TP worker then polls get_finished)."""
        return False

    def get_failed_loads(self) -> set[str]:
        """Request ids whose loads failed: the engine computes their prompts itself."""
        return set()

    def shutdown(self) -> None:
        """Release connections and registered memory."""
