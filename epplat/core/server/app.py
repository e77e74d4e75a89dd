"""The FastAPI app (routes, API-key check, OpenAI-style errors) and its uvicorn runner."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import time
from contextlib import asynccontextmanager
from typing import Optional

import msgspec
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from epplat import __version__
from epplat.core.engine.client import sum_stats
from epplat.core.server.body_check import invalid_json, validation_error
from epplat.core.server.metrics import CONTENT_TYPE, Metrics
from epplat.core.server.protocol import (
    APIError, ChatCompletionRequest, CompletionRequest, ErrorResponse, ModelCard, ModelList, error_response)
from epplat.core.server.request_gate import RequestGate
from epplat.core.server.responses import ResponsesRequest, responses
from epplat.core.server.server_load import InFlight, ServerLoad
from epplat.core.server.serving import OpenAIServing
from epplat.core.server import elastic_scaler, tokenize as tok_api
from epplat.core.server.tokenizer_pool import TokenizerPool

logger = logging.getLogger("epplat.server")

DEAD_EXIT_DELAY_S = 2.0
DEFAULT_MAX_BODY_BYTES = 16 << 20
_decode_json = msgspec.json.Decoder().decode


def build_app(client, *, served_model_names: list[str], api_key: Optional[str] = None,
              max_model_len: Optional[int] = None, model_path: Optional[str] = None, tokenizer_pool_size: int = 1,
              max_choices: int = 128, trust_request_chat_template: bool = False,
              sampling_defaults: Optional[dict] = None, max_logprobs: int = 20, chat_parsers=None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The OpenAI-compatible app over an engine client.

    max_model_len: the context limit requests are checked against; None reads
    ``client.max_model_len`` per request (the engine client learns it when its engines are up).
    model_path: the checkpoint, shown as each model's ``root`` in /v1/models.
    The other options are the flags of the same names (serve.py).
    """
    if not served_model_names:
        raise ValueError("served_model_names must name at least one model")
    metrics = Metrics(served_model_names[0])
    pool = TokenizerPool(client.tokenizer, tokenizer_pool_size)
    serving = OpenAIServing(client, served_model_names, metrics, max_model_len, tokenizer_pool=pool,
                            max_choices=max_choices, trust_request_chat_template=trust_request_chat_template,
                            sampling_defaults=sampling_defaults, max_logprobs=max_logprobs,
                            **(chat_parsers or {}))
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app):
        warm = asyncio.ensure_future(pool.warm_up())
        if hasattr(client, "start"):      # the engine client connects to its engines in this event loop
            await client.start()
        await warm
        try:
            yield
        finally:
            pool.shutdown()

    app = FastAPI(title="epplat", version=__version__, lifespan=lifespan)
    app.state.engine_client = client
    app.add_middleware(RequestGate, api_key=api_key, max_body_bytes=max_body_bytes)
    load = InFlight()
    app.add_middleware(ServerLoad, in_flight=load)

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc)

    app.state.check_body = lambda kind, body: pool.check_body(kind, body, serving.max_model_len, max_choices)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_, exc: RequestValidationError):
        err = (exc.errors() or [{}])[0]
        if err.get("type") == "json_invalid":
            return error_response(invalid_json((err.get("ctx") or {}).get("error", "")))
        return error_response(validation_error({**err, "loc": err.get("loc", ())[1:]}))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):
        response = error_response(APIError(exc.status_code, str(exc.detail)))
        response.headers.update(exc.headers or {})     # 405's Allow
        return response

    @app.exception_handler(Exception)
    async def _internal_error(_, exc: Exception):
        # starlette re-raises it after this response, and uvicorn logs the traceback
        return error_response(exc)

    @app.get("/health", response_class=Response,
             responses={200: {"description": "Serving (empty body)"},
                        503: {"description": "The engines are dead or do not answer (empty body)"}})
    async def health():
        return Response(status_code=200 if client.healthy else 503)

    app.add_api_route("/ping", health, methods=["GET", "POST"], response_class=Response,
                      summary="vLLM's /ping (SageMaker's): the same as /health")

    @app.get("/load")
    async def server_load():
        return {"server_load": load.count}

    @app.post("/tokenize", response_model=tok_api.TokenizeResponse, responses=_ERRORS)
    async def tokenize(raw: Request):
        req = await _request(raw, "tokenize", tok_api.TokenizeRequest)
        return Response(await tok_api.tokenize(serving, req), media_type="application/json")

    @app.post("/detokenize", response_model=tok_api.DetokenizeResponse, responses=_ERRORS)
    async def detokenize(raw: Request):
        req = await _request(raw, "detokenize", tok_api.DetokenizeRequest)
        return Response(await tok_api.detokenize(serving, req), media_type="application/json")

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        stats, per_engine = None, None
        if client.healthy:
            try:
                if hasattr(client, "engine_loads"):   # per-DP-rank stats as well as their sum
                    per_engine = await client.engine_loads()
                    stats = sum_stats(per_engine)
                else:
                    stats = await client.get_stats()
            except Exception as e:
                logger.warning("engine stats unavailable: %s", e)
        return Response(metrics.render(stats, per_engine), media_type=CONTENT_TYPE)

    async def check_engine():
        if not client.healthy:
            raise APIError(503, "The engine is not available; the server is shutting down to be restarted.")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_engine)], route_class=_MsgspecJSONRoute,
                   responses=_ERRORS)

    @v1.get("/models")
    async def models():
        return Response(ModelList(data=[
            ModelCard(id=name, created=created, root=model_path or served_model_names[0],
                      max_model_len=serving.max_model_len) for name in served_model_names]).model_dump_json(),
            media_type="application/json")

    @v1.post("/completions", responses=_STREAMS)
    async def completions(req: CompletionRequest, raw: Request):
        return await serving.completions(req, raw)

    @v1.post("/chat/completions", responses=_STREAMS)
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await serving.chat(req, raw)

    @v1.post("/responses", responses=_STREAMS)
    async def create_response(req: ResponsesRequest, raw: Request):
        return await responses(serving, req, raw)

    app.include_router(v1)
    elastic_scaler.add_routes(app, client, metrics, load)
    app.openapi = functools.partial(_openapi_without_422, app)
    return app


# what the OpenAPI schema says the /v1 routes answer besides 200 (400, never FastAPI's 422)
_ERRORS = {code: {"model": ErrorResponse, "description": what} for code, what in (
    (400, "Invalid request"), (401, "Missing or wrong API key"), (404, "Unknown model"),
    (413, "Request body too large"), (503, "Engine not available"))}
_STREAMS = {200: {"description": "A JSON body, or server-sent events with `stream: true`",
                  "content": {"application/json": {}, "text/event-stream": {}}}}


async def _request(raw: Request, kind: str, cls):
    """The body as `cls`: parsed in a tokenizer worker when large, else here."""
    body = await raw.body()
    parsed = await raw.app.state.check_body(kind, body)
    if parsed is not None:
        return parsed
    try:
        return tok_api.parse(cls, _decode_json(body))
    except msgspec.DecodeError as e:
        raise invalid_json(e) from None


def _openapi_without_422(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


class _MsgspecJSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            try:     # several times faster than json.loads, and no Infinity / NaN
                self._json = _decode_json(await self.body())
            except msgspec.DecodeError as e:
                raise json.JSONDecodeError(str(e), "", 0) from None
        return self._json


_BODY_KINDS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/responses": "responses"}


class _MsgspecJSONRoute(APIRoute):
    """Request bodies parsed by msgspec (FastAPI's own handler then validates them); a large one is
    parsed and validated in a tokenizer worker instead, and the request model it gives is the
    body FastAPI sees (a model instance is not validated again)."""

    def get_route_handler(self):
        handler, kind = super().get_route_handler(), _BODY_KINDS.get(self.path)

        async def route(request: Request):
            request = _MsgspecJSONRequest(request.scope, request.receive)
            if kind is not None:
                parsed = await request.app.state.check_body(kind, await request.body())
                if parsed is not None:
                    request._json = parsed
            return await handler(request)
        return route


def bind_http_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The API server's TCP socket, bound to `host` only (not yet listening); OSError with one line."""
    host = host or "0.0.0.0"
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:          # several API server processes share the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def run_server(app: FastAPI, sock: socket.socket, *, log_level: str = "info",
               timeout_graceful_shutdown: float = 5.0, forwarded_allow_ips: Optional[str] = None) -> None:
    """Serve `app` with uvicorn on the bound `sock` until SIGINT / SIGTERM, or until the engines die.

    On a signal uvicorn stops accepting, lets running requests finish for up to
    `timeout_graceful_shutdown` seconds, then cancels them (which aborts their engine
    requests). When the engine client finds its engines dead, the server stops the same way
    (its requests have already ended with errors) so that a supervisor can restart it.
    X-Forwarded-For / -Proto are believed only from `forwarded_allow_ips` (none by default).
    """
    import uvicorn

    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"
    logger.info("Starting epplat API server on %s", url)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            # uvicorn names no URL when given a socket; say it once the app is up
            logging.getLogger("uvicorn.error").info("Uvicorn running on %s (Press CTRL+C to quit)", url)

    config = uvicorn.Config(app, log_level=log_level, timeout_keep_alive=5,
                            timeout_graceful_shutdown=timeout_graceful_shutdown,
                            proxy_headers=forwarded_allow_ips is not None, forwarded_allow_ips=forwarded_allow_ips)
    server = Server(config)
    client = getattr(app.state, "engine_client", None)
    if client is not None and hasattr(client, "on_dead"):
        # /health and new requests answer 503 for a moment before the server goes (a load balancer
        # polling /health sees why); in-flight requests have already ended with their errors
        client.on_dead.append(lambda: asyncio.get_running_loop().call_later(
            DEAD_EXIT_DELAY_S, lambda: setattr(server, "should_exit", True)))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
