"""One API server process: the engine client, the OpenAI app, uvicorn.

``epplat serve`` runs it in the launcher process, or in children of it when
``--api-server-count`` > 1; the config arrives as JSON.
"""

from __future__ import annotations

from epplat.config import EngineConfig


def run_api_server(cfg_json: bytes, index: int, engine_ranks: list[int], opts: dict, procs=None,
                   sock=None, parent_pid=None) -> int:
    """Serve until stopped (in the launcher process with its bound `sock`, or a child of it when
    --api-server-count > 1). Returns the exit code: 1 when the engines died."""
    from epplat.core.engine.client import EngineClient
    from epplat.core.server.app import bind_http_socket, build_app, run_server
    from epplat.core.server.chat_output import chat_parsers
    from epplat.core.server.model_defaults import load_chat_template, sampling_defaults
    from epplat.core.server.tokenizer import eos_token_ids, load_tokenizer
    from epplat.logs import setup_logging
    if parent_pid is not None:
        from epplat.core.distributed.lifeline import die_with_parent
        die_with_parent(parent_pid)
    setup_logging()
    cfg = EngineConfig.from_json(cfg_json)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.model)
    if opts.get("chat_template") is not None:
        tokenizer.chat_template = load_chat_template(opts["chat_template"])
    client = EngineClient(cfg, tokenizer, eos_token_ids(cfg.model.model, tokenizer), client_index=index,
                          engine_ranks=engine_ranks, procs=procs)
    names = opts["served_model_name"] or [cfg.model.model]
    app = build_app(client, served_model_names=names, api_key=opts["api_key"],
                    sampling_defaults=sampling_defaults(cfg.model.model, opts.get("generation_config", "auto")),
                    max_logprobs=opts.get("max_logprobs", 20),
                    chat_parsers=chat_parsers(opts.get("enable_auto_tool_choice", False), opts.get("tool_call_parser"),
                                              opts.get("reasoning_parser")),
                    **{k: opts[k] for k in ("tokenizer_pool_size", "max_choices", "trust_request_chat_template",
                                            "max_body_bytes")})
    if sock is None:
        sock = bind_http_socket(opts["host"], opts["port"], reuse_port=True)
    try:
        run_server(app, sock, log_level=opts["log_level"], timeout_graceful_shutdown=opts["shutdown_timeout"],
                   forwarded_allow_ips=opts["forwarded_allow_ips"])
    finally:
        client.shutdown()
    if client.dead_reason is not None:
        if parent_pid is not None:
            raise SystemExit(1)
        return 1
    return 0
