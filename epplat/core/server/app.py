"""The FastAPI app: routes, API-key check, OpenAI-style errors, and the uvicorn runner."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from epplat import __version__
from epplat.core.engine.client import sum_stats
from epplat.core.server.metrics import Metrics
from epplat.core.server.protocol import ChatCompletionRequest, CompletionRequest
from epplat.core.server.serving import APIError, OpenAIServing, error_response

logger = logging.getLogger("epplat.server")


def build_app(client, *, served_model_names: list[str], api_key: str | None) -> FastAPI:
    """The app; the engine limits (max_model_len, vocabulary) come from the client once engines are ready."""
    metrics = Metrics(served_model_names[0])
    serving = OpenAIServing(client, served_model_names, metrics)

    @asynccontextmanager
    async def lifespan(app):
        await client.start()
        yield

    app = FastAPI(title="epplat", version=__version__, lifespan=lifespan)

    async def check_api_key(request: Request):
        # a dependency, not an HTTP middleware: BaseHTTPMiddleware hides client disconnects
        if api_key and request.headers.get("Authorization") != f"Bearer {api_key}":
            raise APIError(401, "Unauthorized: a valid API key is required")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return error_response(400, f"{loc + ': ' if loc else ''}{first.get('msg', 'invalid request')}", loc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        logger.exception("internal error")
        return error_response(500, f"{type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health():
        return Response(status_code=200 if client.healthy else 503)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prom():
        per_engine = await client.engine_loads() if client.healthy else {}
        return Response(metrics.render(sum_stats(per_engine), per_engine), media_type="text/plain; version=0.0.4")

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "epplat", "root": client.cfg.model.model,
             "max_model_len": client.max_model_len} for n in served_model_names]}

    @v1.post("/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await serving.completions(req, raw)

    @v1.post("/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        return await serving.chat(req, raw)

    app.include_router(v1)
    return app


def run_server(app: FastAPI, host: str, port: int, log_level: str = "info", reuse_port: bool = False) -> None:
    """Serve with uvicorn; with reuse_port several API server processes share the port."""
    import socket

    import uvicorn
    logger.info("Starting epplat API server on http://%s:%d", host, port)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_keep_alive=5))
    server.run(sockets=[sock])
