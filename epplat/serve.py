"""``epplat serve``: vLLM-named flags -> EngineConfig -> engine core process + OpenAI server."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from epplat.config import DTYPES, CacheConfig, ConfigError, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
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
    p.add_argument("--max-num-batched-tokens", type=_int_range(1), default=None)
    p.add_argument("--block-size", type=int, choices=[1, 8, 16, 32, 64, 128], default=16)
    p.add_argument("--num-gpu-blocks-override", type=_int_range(1), default=None,
                   help="use this many KV cache blocks instead of sizing from memory")
    p.add_argument("--kv-cache-memory-bytes", type=_int_range(1), default=None,
                   help="KV cache size in bytes (cpu default: EPPLAT_CPU_KVCACHE_SPACE GiB, 4)")
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--platform", default="auto", help="auto, cpu, cuda, ascend or a plugin's platform")
    p.add_argument("--all2all-backend", default=None, help="MoE all2all backend (see `epplat plugins`)")
    p.add_argument("--enforce-eager", action="store_true", help="never capture graphs")
    p.add_argument("--quantization", "-q", default=None, help="quantization method (see `epplat plugins`)")
    p.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.set_defaults(func=run)


def engine_config_from_args(args) -> EngineConfig:
    """Check the flags and the model directory; raises ConfigError / PluginError with one line."""
    model = args.model_flag or args.model
    if model is None:
        from epplat.core.model.demo import demo_model_path
        model = str(demo_model_path())
        logger.info("no model given: serving the built-in demo model at %s", model)
    if not Path(model).is_dir():
        raise ConfigError(f"model {model!r} is not a local directory (epplat loads local Hugging Face "
                          "checkpoints; nothing is downloaded at run time)")
    reg = registry()
    platform = reg.pick_platform(args.platform)
    if args.all2all_backend:
        reg.get("all2all", args.all2all_backend, platform)
    if args.quantization:
        reg.get("quantization", args.quantization, platform)
    mcfg = ModelConfig(model=model, served_model_name=(args.served_model_name or [model])[0], dtype=args.dtype,
                       max_model_len=args.max_model_len, seed=args.seed, quantization=args.quantization)
    hf = mcfg.hf_config()
    from epplat.core.model.registry import architecture
    try:
        architecture(hf).parse_config(hf)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model {model!r}: {e}") from None
    max_len = args.max_model_len or hf.get("max_position_embeddings") or 2048
    batched = args.max_num_batched_tokens or max(2048, args.max_num_seqs)
    if not args.enable_chunked_prefill and batched < max_len:
        raise ConfigError(f"--max-num-batched-tokens ({batched}) is smaller than --max-model-len ({max_len}); "
                          "enable chunked prefill or raise it")
    return EngineConfig(
        model=mcfg,
        parallel=ParallelConfig(all2all_backend=args.all2all_backend),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=batched,
                                  enable_chunked_prefill=args.enable_chunked_prefill),
        cache=CacheConfig(block_size=args.block_size, num_gpu_blocks_override=args.num_gpu_blocks_override,
                          kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                          gpu_memory_utilization=args.gpu_memory_utilization),
        platform=platform, enforce_eager=args.enforce_eager)


def eos_token_ids(model_dir: str, tokenizer) -> list[int]:
    """The ids that end generation, as transformers' generate uses them."""
    ids: list = []
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                ids = eos if isinstance(eos, list) else [eos]
                break
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return [int(i) for i in ids]


def run(args) -> int:
    from epplat.logs import setup_logging
    setup_logging()
    try:
        cfg = engine_config_from_args(args)
    except (ConfigError, PluginError) as e:
        print(f"epplat serve: error: {e}", file=sys.stderr)
        return 1
    from transformers import AutoTokenizer

    from epplat.core.engine.client import EngineClient, EngineError
    from epplat.core.server.app import build_app, run_server
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.model)
    except Exception as e:
        print(f"epplat serve: error: cannot load the tokenizer of {cfg.model.model!r}: {e}", file=sys.stderr)
        return 1
    logger.info("epplat %s serving %s on platform %s", _version(), cfg.model.model, cfg.platform)
    client = EngineClient(cfg, tokenizer, eos_token_ids(cfg.model.model, tokenizer))
    try:
        client.launch()
    except (ConfigError, EngineError) as e:
        print(f"epplat serve: error: {e}", file=sys.stderr)
        client.shutdown()
        return 1
    try:
        names = args.served_model_name or [cfg.model.model]
        app = build_app(client, served_model_names=names, api_key=args.api_key,
                        max_model_len=client.max_model_len)
        run_server(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)
    finally:
        client.shutdown()
    return 0


def _version() -> str:
    from epplat import __version__
    return __version__
