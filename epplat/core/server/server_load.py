"""The API server's load as vLLM's /load reports it: how many generation requests are in flight
(counted from when they arrive until their response, streamed or not, has been sent)."""

from __future__ import annotations

COUNTED = ("/v1/completions", "/v1/chat/completions")


class InFlight:
    """The count, shared by the middleware and the /load route."""

    count = 0


class ServerLoad:
    """ASGI middleware counting the requests in flight into `in_flight`."""

    def __init__(self, app, in_flight: InFlight):
        self.app, self.in_flight = app, in_flight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in COUNTED:
            return await self.app(scope, receive, send)
        self.in_flight.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.count -= 1
