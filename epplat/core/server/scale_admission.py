"""Elastic EP: the bound on requests that wait while a scale runs.

Requests keep being accepted during a scale: they wait in the staying ranks' queues for
the re-forming. The wait is bounded: while a scale runs, a generation request that would
make more in flight than the staying ranks run at once (--max-num-seqs each) gets 503 with
a Retry-After of the last scale's length, before its body is read; after the scale, the
bound is gone (the scheduler queues as always).
"""

from __future__ import annotations

import math

from epplat.core.server.protocol import APIError
from epplat.core.server.server_load import COUNTED, InFlight


class ScaleAdmission:
    """ASGI middleware: ``scaler()`` is the ElasticScaler (None without --enable-elastic-ep)."""

    def __init__(self, app, scaler, in_flight: InFlight):
        self.app, self.scaler, self.in_flight = app, scaler, in_flight

    async def __call__(self, scope, receive, send):
        scaler = self.scaler()
        if (scope["type"] == "http" and scope["path"] in COUNTED and scaler is not None and scaler.scaling
                and self.in_flight.count >= scaler.queue_bound()):
            retry = max(1, math.ceil(scaler.last_seconds))
            err = APIError(503, f"A scale of the data parallel engines is running and {self.in_flight.count} "
                                f"requests already wait for it; retry after {retry} s")
            body = err.body().model_dump_json().encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", str(retry).encode()),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
