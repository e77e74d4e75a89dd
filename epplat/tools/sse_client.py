"""A minimal HTTP/1.1 client over asyncio streams: POST a JSON body, read the response's
lines as they arrive (Server-Sent Events, chunked or not).

The load generator of ``epplat bench serve`` shares the machine with the server it
measures, so every microsecond it spends per streamed token is taken from the server:
this client costs a fraction of what a general HTTP library does per chunk. Plain
``http://`` only; one connection per request.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Optional
from urllib.parse import urlsplit


class HTTPStatusError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


class SSEClient:
    def __init__(self, base_url: str, headers: Optional[dict] = None, connect_timeout: float = 30.0):
        u = urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"{base_url!r}: only http://HOST[:PORT] URLs are supported")
        self.host, self.port, self.prefix = u.hostname, u.port or 80, u.path.rstrip("/")
        self.headers = dict(headers or {})
        self.connect_timeout = connect_timeout

    async def post_lines(self, path: str, body: dict) -> AsyncIterator[bytes]:
        """POST ``body`` as JSON to ``path``; yields the response body's lines (without the newline).
        A non-200 status raises HTTPStatusError carrying the body."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.connect_timeout)
        try:
            data = json.dumps(body).encode()
            head = [f"POST {self.prefix}{path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                    "Content-Type: application/json", "Accept: text/event-stream", f"Content-Length: {len(data)}",
                    "Connection: close", *(f"{k}: {v}" for k, v in self.headers.items())]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
            status_line = await reader.readline()
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
                raise ConnectionError(f"not an HTTP response: {status_line[:80]!r}")
            status = int(parts[1])
            chunked, length = False, None
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                name, value = name.strip().lower(), value.strip()
                if name == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
                elif name == "content-length":
                    length = int(value)
            pieces = self._chunks(reader) if chunked else self._plain(reader, length)
            if status != 200:
                raise HTTPStatusError(status, b"".join([p async for p in pieces]).decode(errors="replace"))
            buf = b""
            async for piece in pieces:
                buf += piece
                *lines, buf = buf.split(b"\n")
                for ln in lines:
                    yield ln.rstrip(b"\r")
            if buf:
                yield buf.rstrip(b"\r")
        finally:
            writer.close()

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)

    @staticmethod
    async def _plain(reader: asyncio.StreamReader, length: Optional[int]) -> AsyncIterator[bytes]:
        if length is not None:
            if length:
                yield await reader.readexactly(length)
            return
        while piece := await reader.read(65536):
            yield piece
