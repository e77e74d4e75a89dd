"""Typed configs (model, parallel, scheduler, cache, engine) and their checks.

The CLI fills these from vLLM-named flags; engine cores receive them as JSON
(msgspec), never pickled. ``ConfigError`` carries one line meant for the user.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import msgspec

DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A bad flag or config value; the message is one line for the user."""


class ModelConfig(msgspec.Struct):
    model: str
    served_model_name: Optional[str] = None
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    seed: int = 0
    quantization: Optional[str] = None
    tokenizer: Optional[str] = None     # --tokenizer: a tokenizer folder other than the model's

    def hf_config(self) -> dict:
        path = Path(self.model) / "config.json"
        if not path.is_file():
            raise ConfigError(f"model {self.model!r}: no config.json there "
                              "(give a local Hugging Face checkpoint directory)")
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"model {self.model!r}: config.json is not valid JSON: {e}") from None
        from transformers import AutoConfig  # fills in the defaults a saved config.json omits
        try:
            return AutoConfig.from_pretrained(self.model).to_dict()
        except (ValueError, KeyError) as e:
            raise ConfigError(f"model {self.model!r}: {str(e).splitlines()[0]}") from None


class EPLBConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``--eplb-config``: vLLM's keys and defaults for the expert-parallel load balancer."""

    window_size: Annotated[int, msgspec.Meta(ge=1)] = 1000       # engine steps of load kept
    step_interval: Annotated[int, msgspec.Meta(ge=1)] = 3000     # engine steps between rebalances
    log_balancedness: bool = False
    num_redundant_experts: Annotated[int, msgspec.Meta(ge=0)] = 0
    use_async: bool = False
    policy: str = "default"

    @staticmethod
    def parse(text: Optional[str], dotted: dict[str, str]) -> "EPLBConfig":
        """A JSON object (``--eplb-config '{...}'``) overridden by dotted flags (``--eplb-config.KEY V``)."""
        raw: dict = {}
        if text:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--eplb-config is not valid JSON: {e}") from None
            if not isinstance(raw, dict):
                raise ConfigError("--eplb-config must be a JSON object, e.g. '{\"window_size\": 1000}'")
        for key, value in dotted.items():
            try:
                raw[key] = json.loads(value)
            except json.JSONDecodeError:
                raw[key] = value          # a bare string such as a policy name
        keys = EPLBConfig.__struct_fields__
        unknown = sorted(set(raw) - set(keys))
        if unknown:
            raise ConfigError(f"--eplb-config: unknown key {unknown[0]!r}; valid keys: {', '.join(keys)}")
        try:
            return msgspec.convert(raw, EPLBConfig)
        except msgspec.ValidationError as e:
            raise ConfigError(f"--eplb-config: {e}") from None


KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")


class KVTransferConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``--kv-transfer-config``: vLLM's keys, defaults and meanings (a KV connector for prefill/decode
    disaggregation). The connector named by ``kv_connector`` is looked up among the registered ones."""

    kv_connector: Optional[str] = None
    engine_id: Optional[str] = None                 # a random uuid when unset
    kv_buffer_device: str = "cuda"
    kv_buffer_size: float = 1e9
    kv_role: Optional[str] = None
    kv_rank: Optional[int] = None
    kv_parallel_size: Annotated[int, msgspec.Meta(ge=1)] = 1
    kv_ip: str = "127.0.0.1"
    kv_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 14579
    kv_connector_extra_config: dict = {}
    kv_connector_module_path: Optional[str] = None

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    @staticmethod
    def parse(text: Optional[str]) -> Optional["KVTransferConfig"]:
        if not text:
            return None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--kv-transfer-config is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError('--kv-transfer-config must be a JSON object, e.g. '
                              '\'{"kv_connector":"NixlConnector","kv_role":"kv_both"}\'')
        keys = KVTransferConfig.__struct_fields__
        unknown = sorted(set(raw) - set(keys))
        if unknown:
            raise ConfigError(f"--kv-transfer-config: unknown key {unknown[0]!r}; valid keys: {', '.join(keys)}")
        try:
            cfg = msgspec.convert(raw, KVTransferConfig, strict=False)   # vllm-ascend's guides quote kv_port
        except msgspec.ValidationError as e:
            raise ConfigError(f"--kv-transfer-config: {e}") from None
        if cfg.kv_connector is None:
            raise ConfigError("--kv-transfer-config: kv_connector is required")
        if cfg.kv_role not in KV_ROLES:
            raise ConfigError(f"--kv-transfer-config: kv_role must be one of {', '.join(KV_ROLES)}, "
                              f"not {cfg.kv_role!r}")
        if cfg.engine_id is None:
            import uuid
            cfg.engine_id = str(uuid.uuid4())
        return cfg
SPECULATIVE_METHODS = ("deepseek_mtp", "mtp")   # vLLM's names of the checkpoint's own MTP layer


class SpeculativeConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``--speculative-config``: vLLM's keys for drafting with the checkpoint's MTP layer."""

    method: str
    num_speculative_tokens: Annotated[int, msgspec.Meta(ge=1, le=16)]

    @staticmethod
    def parse(text: str) -> "SpeculativeConfig":
        example = '\'{"method": "deepseek_mtp", "num_speculative_tokens": 1}\''
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--speculative-config is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--speculative-config must be a JSON object, e.g. {example}")
        unknown = sorted(set(raw) - set(SpeculativeConfig.__struct_fields__))
        if unknown:
            raise ConfigError(f"--speculative-config: unknown key {unknown[0]!r}; valid keys: "
                              f"{', '.join(SpeculativeConfig.__struct_fields__)}")
        try:
            spec = msgspec.convert(raw, SpeculativeConfig)
        except msgspec.ValidationError as e:
            raise ConfigError(f"--speculative-config: {e}, e.g. {example}") from None
        if spec.method not in SPECULATIVE_METHODS:
            raise ConfigError(f"--speculative-config: method {spec.method!r} is not supported; "
                              f"supported: {', '.join(SPECULATIVE_METHODS)}")
        return spec


class ParallelConfig(msgspec.Struct):
    """The parallel layout, with vLLM's flag names.

    World ranks are ``(dp_rank * pipeline_parallel_size + pp_rank) * tensor_parallel_size + tp_rank``. ``data_parallel_rank``
    is set in external load-balancing mode (one ``epplat serve`` per DP rank).
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1       # --pipeline-parallel-size: layers split over this many stages
    distributed_executor_backend: str = "mp"   # mp, or ray: engine processes as actors on a Ray cluster
    data_parallel_backend: str = "mp"          # mp, or ray: DP engine cores placed through Ray
    data_parallel_size: int = 1
    data_parallel_size_local: Optional[int] = None
    data_parallel_start_rank: int = 0
    data_parallel_rank: Optional[int] = None
    data_parallel_address: Optional[str] = None   # required off one node; 127.0.0.1 on one
    data_parallel_rpc_port: int = 29550
    api_server_count: int = 1
    headless: bool = False
    ipc_dir: Optional[str] = None   # single node: every socket and the store live here, no TCP ports
    node_addresses: list[str] = []  # Ray across nodes: each world rank's node address (set by the Ray launcher)
    enable_expert_parallel: bool = False
    all2all_backend: Optional[str] = None  # None: the platform's default
    enable_eplb: bool = False
    enable_elastic_ep: bool = False        # --enable-elastic-ep: DP ranks added and removed at run time
    eplb: EPLBConfig = msgspec.field(default_factory=EPLBConfig)
    internal_secret: str = ""             # authenticates every internal frame (frame_auth.py); one node: random
    internal_secret_generated: bool = False   # no secret was given (one node): a KV side channel is then open
    distributed_timeout_seconds: int = 600   # a collective that takes longer fails its engine
    engine_iteration_timeout_s: float = 60.0  # an engine silent this long is dead to its API server

    def __post_init__(self):
        """The layout rules that need no model: one line (vLLM's flag names) per broken rule."""
        dp, start, rank, local = (self.data_parallel_size, self.data_parallel_start_rank, self.data_parallel_rank,
                                  self.data_parallel_size_local)
        if rank is not None:
            if rank >= dp and not self.enable_elastic_ep:     # elastic: a server may join a group of any size
                raise ConfigError(f"--data-parallel-rank {rank} must be below --data-parallel-size {dp}")
            if self.headless or self.api_server_count != 1 or local not in (None, 1) or start:
                raise ConfigError("--data-parallel-rank (external load balancing) runs one DP rank with its own "
                                  "API server: drop --headless, --api-server-count, --data-parallel-size-local and "
                                  "--data-parallel-start-rank")
        if start >= dp:
            raise ConfigError(f"--data-parallel-start-rank {start} must be below --data-parallel-size {dp}")
        if local is not None and start + local > dp:
            raise ConfigError(f"--data-parallel-start-rank {start} + --data-parallel-size-local {local} exceeds "
                              f"--data-parallel-size {dp}")
        if self.headless and self.api_server_count != 1:
            raise ConfigError("--headless starts no API server; drop --api-server-count")
        if start and not self.headless:
            raise ConfigError("a node with --data-parallel-start-rank > 0 runs --headless (the API servers run "
                              "on the node with DP rank 0)")
        if self.enable_eplb and not self.enable_expert_parallel:
            raise ConfigError("--enable-eplb balances experts over expert-parallel ranks: add --enable-expert-parallel")
        if self.eplb.num_redundant_experts and not (self.enable_eplb or self.enable_elastic_ep):
            raise ConfigError("--eplb-config num_redundant_experts needs --enable-eplb")
        if self.enable_elastic_ep:
            self._check_elastic()
        if self.uses_ray and not self.single_node:
            raise ConfigError("--distributed-executor-backend ray / --data-parallel-backend ray place every engine "
                              "process from this launcher: drop --headless, --data-parallel-rank, "
                              "--data-parallel-size-local and --data-parallel-start-rank")
        if self.single_node:
            self.data_parallel_address = self.data_parallel_address or "127.0.0.1"
            if not self.internal_secret:
                self.internal_secret, self.internal_secret_generated = secrets.token_hex(32), True
        elif not self.data_parallel_address:
            raise ConfigError("multi-node and external load-balancing layouts need --data-parallel-address "
                              "(the address of the node with DP rank 0)")
        elif not self.internal_secret:
            raise ConfigError("multi-node and external load-balancing layouts need a shared secret for the internal "
                              "sockets: set EPPLAT_INTERNAL_SECRET (or --internal-secret) to the same value on every node")

    def _check_elastic(self) -> None:
        if not self.enable_expert_parallel:
            raise ConfigError("--enable-elastic-ep scales expert-parallel DP ranks: add --enable-expert-parallel")
        if not self.single_node and not self.external_lb:
            raise ConfigError("--enable-elastic-ep places new ranks on other nodes through Ray, not on headless "
                              "nodes: run every rank from one launcher with --data-parallel-backend ray (Ray places "
                              "them on the cluster's nodes), or each with its own server (--data-parallel-rank), "
                              "which joins and leaves the group")
        if self.api_server_count != 1 or self.pipeline_parallel_size != 1:
            raise ConfigError("--enable-elastic-ep runs with one API server and --pipeline-parallel-size 1 for now: "
                              "drop --api-server-count and --pipeline-parallel-size")

    @property
    def single_node(self) -> bool:
        """Every DP rank and the API servers on this node (the layout that needs no address)."""
        return (not self.external_lb and not self.headless and self.data_parallel_start_rank == 0
                and (self.data_parallel_size_local or self.data_parallel_size) == self.data_parallel_size)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    @property
    def uses_ray(self) -> bool:
        return "ray" in (self.distributed_executor_backend, self.data_parallel_backend)

    @property
    def ranks_per_dp(self) -> int:
        """Engine processes of one DP rank (every stage's TP ranks)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def external_lb(self) -> bool:
        return self.data_parallel_rank is not None

    def local_dp_ranks(self) -> range:
        """The DP ranks whose engine processes this node starts."""
        if self.external_lb:
            return range(self.data_parallel_rank, self.data_parallel_rank + 1)
        local = self.data_parallel_size_local or (self.data_parallel_size - self.data_parallel_start_rank)
        return range(self.data_parallel_start_rank, self.data_parallel_start_rank + local)

    # ports above data_parallel_rpc_port: +0 torch.distributed store, +1/+2 DP wake channel,
    # +10+2i / +11+2i API server i's request (ROUTER) and output (PULL) sockets; Ray across nodes also
    # +100+2r world rank r's step plans from its driver, +101+2d the KV reports to driver d (driver_endpoint)
    @property
    def local_sockets(self) -> bool:
        """Every engine process on the launcher's node: the sockets and the store are files in ipc_dir."""
        return bool(self.ipc_dir) and not self.node_addresses

    def rank_address(self, rank: int) -> str:
        """The address of world rank `rank`'s node (the launcher's own sockets are on data_parallel_address)."""
        return self.node_addresses[rank] if self.node_addresses else self.data_parallel_address

    def api_endpoints(self, index: int) -> tuple[str, str]:
        """(request ROUTER, output PULL) addresses of API server `index` (the DP rank in external LB)."""
        if self.local_sockets:
            return f"ipc://{self.ipc_dir}/api{index}-in", f"ipc://{self.ipc_dir}/api{index}-out"
        h = "127.0.0.1" if self.external_lb else self.data_parallel_address
        base = self.data_parallel_rpc_port + 10 + 2 * index
        return f"tcp://{h}:{base}", f"tcp://{h}:{base + 1}"

    def wake_endpoints(self) -> tuple[str, str]:
        """The wake channel's forwarder runs in world rank 0."""
        if self.local_sockets:
            return f"ipc://{self.ipc_dir}/wake-in", f"ipc://{self.ipc_dir}/wake-out"
        h, p = self.rank_address(0), self.data_parallel_rpc_port
        return f"tcp://{h}:{p + 1}", f"tcp://{h}:{p + 2}"

    def dist_init_method(self) -> Optional[str]:
        """The file store on a single node; None: a TCPStore at (world rank 0's address, rpc port) (parallel_state.py)."""
        return f"file://{self.ipc_dir}/store" if self.local_sockets else None

    def driver_endpoint(self, dp_rank: int, name: str, local_rank: Optional[int] = None) -> str:
        """Where DP rank `dp_rank`'s driver listens on channel `name` ("plan": the steps to its worker
        `local_rank`, pp_rank * TP + tp_rank; "kv-reads": its workers' KV reports, local_rank None): ipc
        when the peers share the driver's node (in ipc_dir on the launcher's, else in the node's temporary
        folder), tcp on the driver's node address when one is on another node (Ray)."""
        driver = dp_rank * self.ranks_per_dp
        peers = range(driver, driver + self.ranks_per_dp) if local_rank is None else [driver + local_rank]
        if self.node_addresses and any(self.node_addresses[r] != self.node_addresses[driver] for r in peers):
            port = self.data_parallel_rpc_port + 100 + (2 * driver + 1 if local_rank is None else 2 * peers[0])
            return f"tcp://{self.node_addresses[driver]}:{port}"
        where = self.ipc_dir if self.local_sockets else tempfile.gettempdir()
        return f"ipc://{where}/{name}-dp{dp_rank}-{'' if local_rank is None else local_rank}-{self.data_parallel_rpc_port}"


class SchedulerConfig(msgspec.Struct):
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"       # --scheduling-policy: fcfs, or priority (lower request priority first, as vLLM)
    async_scheduling: bool = False   # --async-scheduling: step N+1 scheduled and launched before step N's outputs


class CacheConfig(msgspec.Struct):
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: Optional[int] = None
    kv_cache_memory_bytes: Optional[int] = None
    gpu_memory_utilization: float = 0.9


class EngineConfig(msgspec.Struct):
    model: ModelConfig
    parallel: ParallelConfig = msgspec.field(default_factory=ParallelConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    platform: str = "cpu"
    enforce_eager: bool = False
    additional_config: dict = msgspec.field(default_factory=dict)  # --additional-config: platform-specific keys
    kv_transfer: Optional[KVTransferConfig] = None                 # --kv-transfer-config
    speculative: Optional[SpeculativeConfig] = None               # --speculative-config

    def check(self) -> None:
        """The checks that need the checkpoint and the plugins: the model is one epplat serves, the layout
        splits it, the speculative config fits it, the selected plugins (KV connector and quantization
        method included) run on this platform, the platform takes --additional-config.
        Raises ConfigError / PluginError with one line; ``epplat serve`` and every engine core call it."""
        from epplat.plugins import registry
        reg = registry()
        reg.get("platform", self.platform)
        par = self.parallel
        if par.all2all_backend:
            reg.get("all2all", par.all2all_backend, self.platform)
        if self.model.quantization:
            reg.get("quantization", self.model.quantization, self.platform)
        if par.enable_eplb:
            reg.get("eplb_policy", par.eplb.policy, self.platform)
        model = self.model.model
        if not Path(model).is_dir():
            raise ConfigError(f"model {model!r} is not a local directory (epplat loads local Hugging Face "
                              "checkpoints; nothing is downloaded at run time)")
        hf = self.model.hf_config()
        if self.model.quantization is None and (hf.get("quantization_config") or {}).get("quant_method") == "fp8":
            self.model.quantization = "fp8"      # as vLLM: without --quantization the checkpoint's config picks it
            reg.get("quantization", "fp8", self.platform)
        from epplat.core.model.registry import architecture
        try:
            mc = architecture(hf).parse_config(hf)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"model {model!r}: {e}") from None
        max_len = self.model.max_model_len or hf.get("max_position_embeddings") or 2048
        batched = self.scheduler.max_num_batched_tokens
        if not self.scheduler.enable_chunked_prefill and batched < max_len:
            raise ConfigError(f"--max-num-batched-tokens ({batched}) is smaller than --max-model-len ({max_len}); "
                              "enable chunked prefill or raise it")
        check_layout(mc, par)
        if par.pipeline_parallel_size > 1 and self.speculative:
            raise ConfigError("--pipeline-parallel-size > 1 does not run with --speculative-config yet")
        if self.scheduler.async_scheduling:
            check_async_scheduling(self)
        if par.enable_elastic_ep and (self.speculative or self.kv_transfer):
            raise ConfigError("--enable-elastic-ep does not run with --speculative-config or --kv-transfer-config yet")
        if self.speculative is not None:
            check_speculative(self.speculative, hf, model)
        reg.load("platform", self.platform).apply_additional_config(self)
        if self.kv_transfer is not None:     # an unknown or unusable connector is one line before any engine starts
            from epplat.connectors.loader import connector_class
            connector_class(self, warn=True)
        if self.model.quantization:   # the method checks the checkpoint's quantization files
            from epplat.core.model.quant import load_quant_method
            load_quant_method(self, architecture(hf).canonical_name, self.platform)

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @staticmethod
    def from_json(data: bytes) -> "EngineConfig":
        return msgspec.json.decode(data, type=EngineConfig)


def check_async_scheduling(cfg: "EngineConfig") -> None:
    """--async-scheduling refuses what it does not run with yet (vLLM refused PP and speculative decoding
    when it introduced the flag), one line each."""
    par = cfg.parallel
    if par.pipeline_parallel_size > 1:
        raise ConfigError("--async-scheduling is not supported with --pipeline-parallel-size > 1")
    if cfg.speculative is not None:
        raise ConfigError("--async-scheduling is not supported with speculative decoding (--speculative-config)")
    if cfg.kv_transfer is not None:
        raise ConfigError("--async-scheduling is not supported with --kv-transfer-config in epplat yet")
    if par.enable_elastic_ep:
        raise ConfigError("--async-scheduling is not supported with --enable-elastic-ep in epplat yet")


def check_speculative(spec: SpeculativeConfig, hf: dict, model: str) -> None:
    """--speculative-config drafts with the checkpoint's own MTP layer (in every layout: DP ranks run
    their draft passes in lockstep)."""
    if not hf.get("num_nextn_predict_layers"):
        raise ConfigError(f"--speculative-config method {spec.method!r} drafts with the checkpoint's MTP layer; "
                          f"{hf.get('architectures')} checkpoint {model!r} has none (num_nextn_predict_layers)")


def check_layout(mc, par: ParallelConfig) -> None:
    """The one place that says whether a model (its parsed DecoderConfig) splits over a layout."""
    tp, world = par.tensor_parallel_size, par.tensor_parallel_size * par.data_parallel_size   # EP: within a stage
    if par.pipeline_parallel_size > 1:
        from epplat.core.distributed.pipeline import layer_partition
        layer_partition(mc.num_layers, par.pipeline_parallel_size)
    if mc.num_heads % tp or (mc.num_kv_heads % tp and tp % mc.num_kv_heads):
        raise ConfigError(f"{mc.num_heads} attention heads / {mc.num_kv_heads} KV heads do not divide over "
                          f"--tensor-parallel-size {tp}")
    if par.enable_expert_parallel:
        redundant = par.eplb.num_redundant_experts
        # a server of an elastic group other than DP rank 0 takes its expert slots from the running group
        joins = par.enable_elastic_ep and par.external_lb and par.data_parallel_rank
        if (par.enable_eplb or par.enable_elastic_ep) and not joins and (mc.num_experts + redundant) % world:
            extra = f" + {redundant} redundant" if redundant else ""
            raise ConfigError(f"{mc.num_experts}{extra} experts do not divide over EP size {world} "
                              f"(tensor-parallel-size x data-parallel-size)")
    elif mc.num_experts and mc.moe_intermediate_size % tp:
        raise ConfigError(f"expert width {mc.moe_intermediate_size} does not divide over "
                          f"--tensor-parallel-size {tp}")
    dense = [("intermediate size", mc.intermediate_size)] if mc.dense_layers or not mc.num_experts else []
    if getattr(mc, "n_shared_experts", 0):       # DeepSeek's shared experts: a dense MLP split over TP
        dense.append(("shared-expert width", mc.moe_intermediate_size * mc.n_shared_experts))
    for what, width in dense:
        if width % tp:
            raise ConfigError(f"{what} {width} does not divide over --tensor-parallel-size {tp}")


def cache_dir() -> Path:
    """Where epplat keeps what it builds once (the demo model, compiled CPU kernels): EPPLAT_CACHE_DIR."""
    return Path(os.environ.get("EPPLAT_CACHE_DIR") or Path.home() / ".cache" / "epplat")


def cpu_kv_cache_bytes() -> int:
    """KV cache budget on the cpu platform: EPPLAT_CPU_KVCACHE_SPACE GiB (vLLM's VLLM_CPU_KVCACHE_SPACE)."""
    raw = os.environ.get("EPPLAT_CPU_KVCACHE_SPACE") or os.environ.get("VLLM_CPU_KVCACHE_SPACE") or "4"
    try:
        gib = float(raw)
    except ValueError:
        raise ConfigError(f"EPPLAT_CPU_KVCACHE_SPACE={raw!r} is not a number of GiB") from None
    if gib <= 0:
        raise ConfigError("EPPLAT_CPU_KVCACHE_SPACE must be > 0 GiB")
    return int(gib * (1 << 30))
