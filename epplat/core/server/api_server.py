"""One API server process: the engine client, the OpenAI app, uvicorn.

``epplat serve`` runs it in the launcher process, or in children of it when
``--api-server-count`` > 1; the config arrives as JSON.
"""

from __future__ import annotations

from epplat.config import EngineConfig


def run_api_server(cfg_json: bytes, index: int, engine_ranks: list[int], opts: dict, procs=None) -> None:
    """Serve until stopped. ``opts``: host, port, api_key, served_model_name, log_level."""
    from epplat.core.engine.client import EngineClient
    from epplat.core.server.app import build_app, run_server
    from epplat.core.server.tokenizer import eos_token_ids, load_tokenizer
    from epplat.logs import setup_logging
    setup_logging()
    cfg = EngineConfig.from_json(cfg_json)
    tokenizer = load_tokenizer(cfg.model.model)
    client = EngineClient(cfg, tokenizer, eos_token_ids(cfg.model.model, tokenizer), client_index=index,
                          engine_ranks=engine_ranks, procs=procs)
    names = opts["served_model_name"] or [cfg.model.model]
    app = build_app(client, served_model_names=names, api_key=opts["api_key"])
    try:
        run_server(app, host=opts["host"], port=opts["port"], log_level=opts["log_level"],
                   reuse_port=cfg.parallel.api_server_count > 1)
    finally:
        client.shutdown()
