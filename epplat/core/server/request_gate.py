"""The gate every HTTP request passes before the app sees it (plain ASGI, so client
disconnects still reach the handlers): the API key of /v1/* is checked before a byte of the
body is read, and a body is read in full, up to ``--max-request-body-size``, before the app
parses it; one that declares or turns out larger gets a 413 at once, without being kept."""

from __future__ import annotations

import hmac
from typing import Optional

from epplat.core.server.protocol import APIError

_BODY_METHODS = {"POST", "PUT", "PATCH"}


class RequestGate:
    def __init__(self, app, *, api_key: Optional[str], max_body_bytes: int):
        self.app, self.max_body = app, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"].startswith("/v1") and not hmac.compare_digest(
                headers.get(b"authorization", b""), self.expected):
            return await _reply(send, APIError(401, "Unauthorized: a valid API key is required "
                                                    "(Authorization: Bearer ...)."))
        if scope["method"] not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            return await _reply(send, self._too_large())
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return await _reply(send, self._too_large())
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        del chunks

        async def replay():
            nonlocal whole
            if whole is not None:
                msg, whole = whole, None
                return msg
            return await receive()      # later calls: disconnect detection

        return await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than this server accepts ({self.max_body} bytes; "
                             "--max-request-body-size).")


async def _reply(send, err: APIError) -> None:
    body = err.body().model_dump_json().encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
