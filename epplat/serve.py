"""``epplat serve``: vLLM-named flags -> EngineConfig -> engine core process + OpenAI server."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time

from epplat.config import (DTYPES, CacheConfig, ConfigError, EngineConfig, EPLBConfig, KVTransferConfig, ModelConfig,
                           ParallelConfig, SchedulerConfig, SpeculativeConfig)
from epplat import vllm_flags
from epplat.plugins import PluginError, registry

logger = logging.getLogger("epplat.serve")


def _int_range(lo: int, hi: int | None = None):
    def parse(s: str) -> int:
        v = _human_int(s)
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{s!r} is out of range [{lo}, {hi if hi is not None else 'inf'}]")
        return v
    parse.__name__ = "integer"
    return parse


def _human_int(s: str) -> int:
    """'4096', '4k', '1M' -> int (vLLM accepts the same suffixes for --max-model-len)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer")
    mult = {"": 1, "k": 1000, "K": 1024, "m": 10**6, "M": 1 << 20, "g": 10**9, "G": 1 << 30}[m.group(2)]
    return int(m.group(1)) * mult


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{s!r} must be in (0, 1]")
    return v


def _json_object(s: str) -> dict:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return v


def _env(name: str, default):
    """EPPLAT_<name>, else vLLM's VLLM_<name>, else default."""
    return os.environ.get(f"EPPLAT_{name}") or os.environ.get(f"VLLM_{name}") or default


def _env_int(name: str, default):
    raw = _env(name, None)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"epplat serve: error: EPPLAT_{name}={raw!r} is not an integer") from None


def _env_float(name: str, default: float) -> float:
    raw = _env(name, None)
    try:
        v = default if raw is None else float(raw)
    except ValueError:
        v = -1.0
    if not v > 0 or v == float("inf"):
        raise ConfigError(f"EPPLAT_{name}={raw!r} must be a positive number of seconds")
    return v


def add_cli(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve a MoE model (a local Hugging Face checkpoint directory; "
                                   "the built-in demo model when none is given).")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: built-in demo model)")
    p.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=_int_range(0, 65535), default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--max-model-len", type=_int_range(1), default=None)
    p.add_argument("--max-num-seqs", type=_int_range(1), default=256)
    p.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs",
                   help="vLLM's: fcfs, or priority (requests' `priority` field, lower first)")
    p.add_argument("--max-num-batched-tokens", type=_int_range(1), default=None,
                   help="tokens a step may schedule (default 2048; 16384 on cuda)")
    p.add_argument("--async-scheduling", action="store_true",
                   help="vLLM's: schedule and launch step N+1 while the device runs step N (same tokens)")
    p.add_argument("--block-size", type=int, choices=[1, 8, 16, 32, 64, 128], default=16)
    p.add_argument("--num-gpu-blocks-override", type=_int_range(1), default=None,
                   help="use this many KV cache blocks instead of sizing from memory")
    p.add_argument("--kv-cache-memory-bytes", type=_int_range(1), default=None,
                   help="KV cache size in bytes (cpu default: EPPLAT_CPU_KVCACHE_SPACE GiB, 4)")
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--platform", default="auto", help="auto, cpu, cuda, ascend or a plugin's platform")
    par = p.add_argument_group("parallelism (vLLM's flags)")
    par.add_argument("--tensor-parallel-size", "-tp", type=_int_range(1), default=1)
    par.add_argument("--pipeline-parallel-size", "-pp", type=_int_range(1), default=1,
                     help="layers split over this many stages (EPPLAT_PP_LAYER_PARTITION=3,2 sets the split)")
    par.add_argument("--distributed-executor-backend", choices=["mp", "uni", "ray"], default="mp",
                     help="ray: engine processes as actors on the Ray cluster at RAY_ADDRESS (pip install "
                          "'epplat[ray]'); uni is mp")
    par.add_argument("--data-parallel-backend", "-dpb", choices=["mp", "ray"], default="mp",
                     help="ray: each DP rank's engine processes placed by Ray on one node of the cluster")
    par.add_argument("--data-parallel-size", "-dp", type=_int_range(1), default=_env_int("DP_SIZE", 1))
    par.add_argument("--data-parallel-size-local", "-dpl", type=_int_range(1), default=None,
                     help="DP ranks started on this node (default: all from the start rank)")
    par.add_argument("--data-parallel-start-rank", "-dpr", type=_int_range(0), default=0)
    par.add_argument("--data-parallel-rank", type=_int_range(0), default=_env_int("DP_RANK", None),
                     help="external load balancing: this server is DP rank R only (env EPPLAT_DP_RANK)")
    par.add_argument("--data-parallel-address", "-dpa", default=_env("DP_MASTER_IP", None),
                     help="address of the node with DP rank 0 (env EPPLAT_DP_MASTER_IP)")
    par.add_argument("--data-parallel-rpc-port", "-dpp", type=_int_range(1, 65000),
                     default=_env_int("DP_MASTER_PORT", None), help="base port (env EPPLAT_DP_MASTER_PORT)")
    par.add_argument("--headless", action="store_true", help="start engines only, no API server")
    par.add_argument("--api-server-count", "-asc", type=_int_range(1), default=1)
    par.add_argument("--enable-expert-parallel", "-ep", action="store_true")
    par.add_argument("--enable-eplb", action="store_true", help="expert-parallel load balancer (needs -ep)")
    par.add_argument("--enable-elastic-ep", action="store_true",
                     help="let POST /scale_elastic_ep grow or shrink the DP ranks at run time (needs -ep)")
    par.add_argument("--eplb-config", default=None, metavar="JSON",
                     help="EPLB settings as JSON or dotted flags (--eplb-config.window_size 1000): window_size, "
                          "step_interval, log_balancedness, num_redundant_experts, use_async, policy")
    for key in EPLBConfig.__struct_fields__:
        par.add_argument(f"--eplb-config.{key}", dest=f"eplb_config_{key}", default=None, help=argparse.SUPPRESS)
    p.add_argument("--all2all-backend", default=None, help="MoE all2all backend (see `epplat plugins`)")
    p.add_argument("--enforce-eager", action="store_true", help="never capture graphs")
    p.add_argument("--quantization", "-q", default=None, help="quantization method (see `epplat plugins`)")
    p.add_argument("--additional-config", type=_json_object, default={},
                   help="platform-specific options as JSON (ascend: vllm-ascend's torchair_graph_config, ...)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "deepseek_mtp", "num_speculative_tokens": 1}\'')
    p.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    p.add_argument("--kv-transfer-config", default=None, metavar="JSON",
                   help='KV connector for prefill/decode disaggregation, vLLM\'s keys, e.g. '
                        '\'{"kv_connector":"NixlConnector","kv_role":"kv_both"}\'')
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of cached prompt prefixes (default: on)")
    rel = p.add_argument_group("reliability and security")
    rel.add_argument("--internal-secret", default=None,
                     help="secret that authenticates the internal sockets; the same on every node (env "
                          "EPPLAT_INTERNAL_SECRET, which ps does not show; generated for single-node runs)")
    rel.add_argument("--distributed-timeout-seconds", type=_int_range(1), default=600,
                     help="a collective (all_gather, all2all) that takes longer fails its engine")
    rel.add_argument("--shutdown-timeout", type=_int_range(0), default=_env_int("SHUTDOWN_TIMEOUT", 30),
                     help="on SIGTERM/SIGINT, seconds in-flight requests get to finish before they are cancelled")
    rel.add_argument("--max-request-body-size", type=_int_range(1), default=16 << 20,
                     help="larger request bodies get 413 while being read (bytes; 16M by default)")
    rel.add_argument("--tokenizer-pool-size", type=_int_range(1), default=1,
                     help="processes that tokenize long prompts (and threads that render chat templates) "
                          "beside the API server's event loop")
    rel.add_argument("--max-choices-per-request", type=_int_range(1), default=128,
                     help="most prompts x n one request may ask for")
    rel.add_argument("--trust-request-chat-template", action="store_true",
                     help="accept chat templates sent in requests (chat_template); refused by default")
    rel.add_argument("--generation-config", default="auto",
                     help="vLLM's: auto applies the checkpoint's generation_config.json sampling defaults to "
                          "requests that do not set them; vllm ignores them; a folder takes that folder's")
    rel.add_argument("--chat-template", default=None, help="a chat template file, or the template inline")
    rel.add_argument("--tokenizer", default=None, help="a tokenizer folder other than the model's")
    rel.add_argument("--max-logprobs", type=_int_range(0), default=20,
                     help="most logprobs (and prompt_logprobs) a request may ask for per token")
    rel.add_argument("--enable-auto-tool-choice", action="store_true",
                     help="vLLM's: tool_choice auto (the model decides to call tools), read by --tool-call-parser")
    rel.add_argument("--tool-call-parser", default=None,
                     help="the model's tool-call format (epplat plugins lists them)")
    rel.add_argument("--reasoning-parser", default=None,
                     help="splits reasoning_content from content (qwen3, deepseek_r1; epplat plugins lists them)")
    rel.add_argument("--forwarded-allow-ips", default=None,
                     help="comma-separated addresses (or *) of proxies whose X-Forwarded-For/-Proto headers "
                          "are believed; none by default")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    vllm_flags.add_arguments(p)
    p.set_defaults(func=run)


def engine_config_from_args(args) -> EngineConfig:
    """Flags -> EngineConfig, checked (EngineConfig.check); raises ConfigError / PluginError with one line."""
    vllm_flags.check(args)
    model = args.model_flag or args.model
    if model is None:
        from epplat.tools.demo import demo_model_path
        model = str(demo_model_path())
        logger.info("no model given: serving the built-in demo model at %s", model)
    platform = registry().pick_platform(args.platform)
    if args.all2all_backend and not args.enable_expert_parallel:
        logger.info("--all2all-backend %s is used for the MoE layers' (single-rank) dispatch; "
                    "add --enable-expert-parallel to spread experts over ranks", args.all2all_backend)
    mcfg = ModelConfig(model=model, served_model_name=(args.served_model_name or [model])[0], dtype=args.dtype,
                       max_model_len=args.max_model_len, seed=args.seed, quantization=args.quantization,
                       tokenizer=args.tokenizer)
    parallel = parallel_config_from_args(args)
    default_batched = registry().load("platform", platform).default_max_num_batched_tokens
    cfg = EngineConfig(
        model=mcfg, parallel=parallel,
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens or max(default_batched,
                                                                                            args.max_num_seqs),
                                  enable_chunked_prefill=args.enable_chunked_prefill,
                                  policy=args.scheduling_policy, async_scheduling=args.async_scheduling),
        cache=CacheConfig(block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching,
                          num_gpu_blocks_override=args.num_gpu_blocks_override,
                          kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                          gpu_memory_utilization=args.gpu_memory_utilization),
        platform=platform, enforce_eager=args.enforce_eager, additional_config=args.additional_config,
        speculative=(SpeculativeConfig.parse(args.speculative_config)
                     if args.speculative_config is not None else None),
        kv_transfer=KVTransferConfig.parse(args.kv_transfer_config))
    cfg.check()
    if parallel.single_node:
        parallel.ipc_dir = tempfile.mkdtemp(prefix="epplat-")
    return cfg


def parallel_config_from_args(args) -> ParallelConfig:
    eplb = EPLBConfig.parse(args.eplb_config, {k: v for k in EPLBConfig.__struct_fields__
                                               if (v := getattr(args, f"eplb_config_{k}", None)) is not None})
    return ParallelConfig(
        internal_secret=args.internal_secret or _env("INTERNAL_SECRET", ""),
        distributed_timeout_seconds=args.distributed_timeout_seconds,
        engine_iteration_timeout_s=_env_float("ENGINE_ITERATION_TIMEOUT_S", 60.0),
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
        distributed_executor_backend="mp" if args.distributed_executor_backend == "uni" else
        args.distributed_executor_backend, data_parallel_backend=args.data_parallel_backend,
        data_parallel_size=args.data_parallel_size,
        data_parallel_size_local=args.data_parallel_size_local, data_parallel_start_rank=args.data_parallel_start_rank,
        data_parallel_rank=args.data_parallel_rank, data_parallel_address=args.data_parallel_address,
        data_parallel_rpc_port=args.data_parallel_rpc_port or 29550, api_server_count=args.api_server_count,
        headless=args.headless, enable_expert_parallel=args.enable_expert_parallel,
        all2all_backend=args.all2all_backend, enable_eplb=args.enable_eplb,
        enable_elastic_ep=args.enable_elastic_ep, eplb=eplb)


def run(args) -> int:
    from epplat.logs import setup_logging
    setup_logging()
    try:
        cfg = engine_config_from_args(args)
    except (ConfigError, PluginError) as e:
        print(f"epplat serve: error: {e}", file=sys.stderr)
        return 1
    try:
        return _serve(args, cfg)
    finally:
        if cfg.parallel.ipc_dir:
            shutil.rmtree(cfg.parallel.ipc_dir, ignore_errors=True)


class _StopSignals:
    """SIGTERM / SIGINT in the launcher: during startup they end it at once (engines stopped, socket
    folder removed, exit 0); while uvicorn serves, its own handlers drain the requests and it
    re-raises the signal after, which lands here and is only noted, so the cleanup runs."""

    def __init__(self):
        self.received, self.starting = None, True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self)

    def __call__(self, sig, _frame):
        self.received = sig
        if self.starting:
            self.starting = False
            raise SystemExit(0)


def _serve(args, cfg: EngineConfig) -> int:
    from epplat.core.distributed.launcher import stop_engines
    from epplat.core.server.api_server import run_api_server
    from epplat.core.server.tokenizer import load_tokenizer
    from epplat.core.server.app import bind_http_socket
    from epplat.core.server.model_defaults import load_chat_template, sampling_defaults
    from epplat.core.server.chat_output import chat_parsers
    par = cfg.parallel
    stop = _StopSignals()
    http = None
    if not par.headless:
        try:
            load_tokenizer(cfg.model.tokenizer or cfg.model.model)
            if args.chat_template is not None:
                load_chat_template(args.chat_template)
            sampling_defaults(cfg.model.model, args.generation_config)
            chat_parsers(args.enable_auto_tool_choice, args.tool_call_parser, args.reasoning_parser)
            # the port is taken before the model loads, so a clash is reported at once
            http = bind_http_socket(args.host, args.port, reuse_port=par.api_server_count > 1)
        except (ConfigError, PluginError, OSError) as e:
            print(f"epplat serve: error: {e}", file=sys.stderr)
            return 1
    logger.info("epplat %s serving %s on platform %s (TP=%d, PP=%d, DP=%d%s)", _version(), cfg.model.model,
                cfg.platform, par.tensor_parallel_size, par.pipeline_parallel_size, par.data_parallel_size, ", EP" if par.enable_expert_parallel else "")
    if par.ipc_dir:
        logger.info("internal sockets in %s", par.ipc_dir)
    try:
        procs = _start_engines(cfg)
    except ConfigError as e:
        print(f"epplat serve: error: {e}", file=sys.stderr)
        return 1
    cfg = getattr(procs, "cfg", cfg)
    try:
        if par.headless:
            return _wait(procs, [])
        engine_ranks = [par.data_parallel_rank] if par.external_lb else list(range(par.data_parallel_size))
        index = par.data_parallel_rank if par.external_lb else 0
        if par.external_lb or par.api_server_count == 1:
            stop.starting = False
            code = run_api_server(cfg.to_json(), index, engine_ranks, _server_opts(args), procs, http)
            if par.enable_elastic_ep and par.external_lb:
                from epplat.core.distributed.elastic_members import leave
                leave(cfg, procs)          # its requests drained: its experts move to the others, it leaves
            return code
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        metrics_dir = _shared_metrics_dir()
        try:
            # not daemonic, as each starts its tokenizer workers; they die with this launcher (lifeline.py)
            servers = [ctx.Process(target=run_api_server, name=f"APIServer_{i}", daemon=False,
                                   args=(cfg.to_json(), i, engine_ranks, _server_opts(args), None, None, os.getpid()))
                       for i in range(par.api_server_count)]
            for s in servers:
                s.start()
            return _wait(procs, servers, args.shutdown_timeout + 5)
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
    finally:
        stop_engines(procs)
        if http is not None:
            http.close()


def _shared_metrics_dir() -> str | None:
    """Several API servers keep their request series in files of one folder, and whichever a scrape reaches
    sums them all (prometheus_client's multiprocess mode, as vLLM does). A folder PROMETHEUS_MULTIPROC_DIR
    names is used as it is (left there, and what earlier runs wrote in it counts); else a fresh one, removed
    at exit. Returns the folder to remove."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        logger.info("API servers' metrics in PROMETHEUS_MULTIPROC_DIR=%s (not cleared here)",
                    os.environ["PROMETHEUS_MULTIPROC_DIR"])
        return None
    path = tempfile.mkdtemp(prefix="epplat-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path      # the API servers inherit it: they import prometheus_client
    return path


class _Engines(list):
    """The engine processes, and the config they run (a server joining a running group: its size)."""
    cfg = None


def _start_engines(cfg: EngineConfig):
    """This node's engines; with elastic EP and external load balancing, a server started after its group
    joins it (elastic_members.py)."""
    from epplat.core.distributed.launcher import start_engines
    par = cfg.parallel
    if par.enable_elastic_ep and not (par.external_lb or par.uses_ray):
        from epplat.core.distributed import fork_server
        fork_server.context()      # a scale-up's ranks are forked from it: it imports while these engines start
    if not (par.enable_elastic_ep and par.external_lb):
        return start_engines(cfg)
    from epplat.core.distributed import elastic_members
    new, join = elastic_members.join_if_running(cfg)
    if join is None:
        return start_engines(cfg)
    try:
        with elastic_members.loading(par, join):
            procs = _Engines(start_engines(new, dp_ranks=[join["dp_rank"]], join=join))
    except BaseException:
        elastic_members.loaded(par, join, ok=False)
        raise
    elastic_members.loaded(par, join, ok=True)
    procs.cfg = new
    return procs


def _server_opts(args) -> dict:
    return {"host": args.host, "port": args.port, "api_key": args.api_key,
            "served_model_name": args.served_model_name, "log_level": args.uvicorn_log_level,
            "shutdown_timeout": args.shutdown_timeout, "max_body_bytes": args.max_request_body_size,
            "tokenizer_pool_size": args.tokenizer_pool_size, "max_choices": args.max_choices_per_request,
            "trust_request_chat_template": args.trust_request_chat_template,
            "forwarded_allow_ips": args.forwarded_allow_ips, "generation_config": args.generation_config,
            "chat_template": args.chat_template, "tokenizer": args.tokenizer, "max_logprobs": args.max_logprobs,
            "enable_auto_tool_choice": args.enable_auto_tool_choice, "tool_call_parser": args.tool_call_parser,
            "reasoning_parser": args.reasoning_parser}


def _wait(procs, servers, grace: float = 10.0) -> int:
    """Block until SIGINT/SIGTERM or until any child exits; then everything is stopped (API
    servers get `grace` seconds to drain)."""
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    children = procs + servers
    while not stop:
        dead = [p for p in children if not p.is_alive()]
        if dead:
            log = logger.info if dead[0].exitcode == 0 else logger.error
            log("%s exited with code %s; stopping every process", dead[0].name, dead[0].exitcode)
            break
        time.sleep(0.2)
    from epplat.core.distributed.launcher import stop_engines
    stop_engines(servers, grace)
    return 0 if stop else 1


def _version() -> str:
    from epplat import __version__
    return __version__
