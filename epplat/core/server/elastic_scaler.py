"""Elastic EP in the API server: POST /scale_elastic_ep (and /scale) grows or shrinks the DP ranks.

Scaling up, the new engine processes start beside the running ones (which keep serving),
forked from a fork server that imported the engine once (fork_server.py), however many there are,
load the model and take the running ranks' KV cache size; then every running driver gets
the scale call, they all re-form the world with the new ranks at one step, the experts
move to the EPLB policy's placement, and the new ranks are routed to once they say
ready. Scaling down, the departing ranks get no new requests and hand their running and
waiting ones to the staying ranks, which recompute their KV and continue their streams with
the same tokens; what cannot move (a request with a grammar) finishes there (within
drain_timeout, else 408 and nothing changes); their experts move to the staying ranks, and
they leave. Requests that arrive meanwhile wait in the staying ranks' queues
for at most the re-forming, bounded (scale_admission.py). Answers are vLLM's (vllm-interfaces.md); 409 while a scale runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import msgspec
from fastapi import Request

from epplat.config import ConfigError
from epplat.core.engine import protocol as P
from epplat.core.server.protocol import APIError, ErrorResponse

logger = logging.getLogger("epplat.server")

DEFAULT_DRAIN_TIMEOUT = 120
_CALL_TIMEOUT = 300.0


def parse_scale_body(body) -> tuple[int, int]:
    """vLLM's body {"new_data_parallel_size": N, "drain_timeout": S}; APIError(400) when it is not that."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object with new_data_parallel_size")
    size, drain = body.get("new_data_parallel_size"), body.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT)
    if size is None:
        raise APIError(400, "new_data_parallel_size is required")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise APIError(400, "new_data_parallel_size must be a positive integer")
    if not isinstance(drain, int) or isinstance(drain, bool) or drain <= 0:
        raise APIError(400, "drain_timeout must be a positive integer")
    return size, drain


class ElasticScaler:
    """The scale operations of one API server's engine client (the only API server: config.py says so)."""

    def __init__(self, client, metrics=None):
        from epplat.core.model.registry import architecture
        self.client, self.metrics = client, metrics
        self.scaling = False
        self.generation = 0              # world generation; the startup world is 0
        self.phases: dict[str, float] = {}     # seconds of each part of the last scale (logged)
        par, hf = client.cfg.parallel, client.cfg.model.hf_config()
        self.tp = par.tensor_parallel_size
        self.procs = {r: client.procs[i * self.tp:(i + 1) * self.tp] for i, r in enumerate(client.engine_ranks)}
        self.num_experts = architecture(hf).parse_config(hf).num_experts
        self.per_rank = (self.num_experts + par.eplb.num_redundant_experts) // par.world_size   # slots of an EP rank
        self.ray = par.uses_ray          # new ranks are Ray actors, placed on the cluster (ray_launcher.py)
        self.target = self.size          # the size being scaled to (the current one when none runs)
        self.last_seconds = 3.0          # the last scale's length: the Retry-After of a 503 during one

    def queue_bound(self) -> int:
        """Requests in flight allowed while a scale runs: what the staying ranks run at once."""
        return self.client.cfg.scheduler.max_num_seqs * min(self.size, self.target)

    @property
    def size(self) -> int:
        return self.client.cfg.parallel.data_parallel_size

    def check_size(self, new_size: int) -> None:
        """400 for a size the experts cannot be placed on (each rank keeps its number of expert slots), or one
        with more engine processes than this node has devices (one node: every rank is local), or with Ray
        new ranks the cluster has no room for."""
        from epplat.core.distributed.launcher import check_devices
        try:
            if not self.ray:
                check_devices(self.client.cfg, new_size * self.tp)
            elif new_size > self.size:
                from epplat.core.distributed.ray_launcher import check_room
                from epplat.plugins import registry
                check_room(self.client.cfg, registry().load("platform", self.client.cfg.platform),
                           range(self.size, new_size))
        except ConfigError as e:
            raise APIError(400, f"new_data_parallel_size {new_size} is too large: {e}") from None
        if self.per_rank * new_size * self.tp < self.num_experts:
            raise APIError(400, f"new_data_parallel_size {new_size} is too small: {new_size * self.tp} EP ranks x "
                                f"{self.per_rank} expert slots each cannot hold the model's {self.num_experts} "
                                "experts")

    async def scale(self, new_size: int, drain_timeout: int) -> str:
        if self.scaling:
            raise APIError(409, "A scale is already running; try again when /is_scaling_elastic_ep says false")
        self.check_size(new_size)
        self.scaling, self.phases, self.target = True, {}, new_size
        t0, old = time.perf_counter(), self.size
        try:
            if new_size > old:
                await self._grow(new_size)
            elif new_size < old:
                await self._shrink(new_size, drain_timeout)
        finally:
            self.scaling = False
        took = self.last_seconds = time.perf_counter() - t0
        self.target = self.size
        logger.info("elastic EP: scaled from %d to %d data parallel engines in %.2f s (%s)", old, new_size, took,
                    ", ".join(f"{k} {v:.2f} s" for k, v in self.phases.items()))
        if self.metrics is not None and new_size != old:
            self.metrics.elastic_scaled(old, new_size, took)
        return f"Scaled to {new_size} data parallel engines"

    def _new_rank_config(self, new_size: int):
        cfg = type(self.client.cfg).from_json(self.client.cfg.to_json())
        self._resize(cfg.parallel, new_size)
        cfg.cache.num_gpu_blocks_override = self.client.num_blocks    # the running ranks' size: no profiling
        return cfg

    def _resize(self, par, new_size: int) -> None:
        par.data_parallel_size = new_size
        del par.node_addresses[new_size * self.tp:]      # Ray: the world ranks' nodes (a scale-up's: _grow)
        par.eplb.num_redundant_experts = self.per_rank * new_size * self.tp - self.num_experts

    async def _grow(self, new_size: int) -> None:
        from epplat.core.distributed.launcher import start_engines
        client, old = self.client, self.size
        new_ranks = list(range(old, new_size))
        cfg = self._new_rank_config(new_size)
        self.generation += 1            # every attempt its own store: a failed one may have written to its own
        generation, t0 = self.generation, time.monotonic()
        try:
            procs = await asyncio.to_thread(start_engines, cfg, dp_ranks=new_ranks,
                                            join={"generation": generation, "old_size": old}, forked=not self.ray)
        except ConfigError as e:
            raise APIError(500, f"Scale failed: a new engine did not start ({e}); still {old} data parallel "
                                "engines") from None
        self.phases["start"], t0 = time.monotonic() - t0, time.monotonic()
        for r in new_ranks:
            client.load[r] = 0                  # EngineReady from these ranks is now taken
        try:
            await self._call_all(range(old), new_size, generation)
        except APIError as e:                   # the running ranks kept their world (JoinAborted)
            from epplat.core.distributed.launcher import stop_engines
            await asyncio.to_thread(stop_engines, procs)
            for r in new_ranks:
                client.load.pop(r, None)
            raise APIError(500, f"{e.message}; still {old} data parallel engines") from None
        self.phases["re-form"] = time.monotonic() - t0
        deadline = time.monotonic() + _CALL_TIMEOUT
        while not set(new_ranks) <= client._ready:
            if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                raise APIError(500, "Scale failed: the new engines joined but did not become ready")
            await asyncio.sleep(0.02)
        for i, r in enumerate(new_ranks):
            self.procs[r] = procs[i * self.tp:(i + 1) * self.tp]
        client.procs.extend(procs)
        client.engine_ranks.extend(new_ranks)
        client.cfg.parallel.node_addresses = cfg.parallel.node_addresses     # Ray: where the new ranks went
        self._resize(client.cfg.parallel, new_size)

    async def _shrink(self, new_size: int, drain_timeout: int) -> None:
        client, old = self.client, self.size
        leaving = list(range(new_size, old))
        del client.engine_ranks[new_size:]          # no new request goes to a departing rank
        t0 = deadline = time.monotonic()
        deadline += drain_timeout
        await self._hand_off(leaving)
        self.phases["hand-off"], t0 = time.monotonic() - t0, time.monotonic()
        while any(client.load.get(r) for r in leaving):
            if time.monotonic() > deadline:
                client.engine_ranks.extend(leaving)
                raise APIError(408, f"Scale failed due to request drain timeout after {drain_timeout} seconds")
            await asyncio.sleep(0.02)
        self.phases["drain"] = time.monotonic() - t0
        procs = [p for r in leaving for p in self.procs.pop(r)]
        for p in procs:                             # their exit is not an engine death
            client.procs.remove(p)
        for r in leaving:
            client.last_heard.pop(r, None)
        self.generation += 1
        generation, t0 = self.generation, time.monotonic()
        await self._call_all(range(old), new_size, generation)
        self.phases["re-form"] = time.monotonic() - t0
        for r in leaving:
            client.load.pop(r, None)
            client._ready.discard(r)
        # reaped meanwhile (a Ray actor's placement group given back)
        threading.Thread(target=lambda: [p.join(30) for p in procs], daemon=True).start()
        self._resize(client.cfg.parallel, new_size)

    async def _hand_off(self, leaving: list[int]) -> None:
        """The departing ranks' running and waiting requests go on on the staying ranks (their prompt, output so
        far and sampling state: core.hand_off), so that the scale need not wait for them; what cannot move
        (a request with a grammar) is left to the drain."""
        client = self.client
        try:
            moved = await asyncio.gather(*(client.call(r, "hand_off_requests", timeout=_CALL_TIMEOUT)
                                           for r in leaving))
        except Exception as e:
            logger.warning("elastic EP: the departing ranks did not hand their requests over (%s): they drain", e)
            return
        count = 0
        for r, requests in zip(leaving, moved):
            for er in msgspec.convert(requests, list[P.EngineRequest]):
                count += await client.move_request(er, r)
        logger.info("elastic EP: %d requests moved off the departing DP ranks %s", count, leaving)

    async def _call_all(self, ranks, new_size: int, generation: int) -> None:
        try:
            await asyncio.gather(*(self.client.call(r, "scale_elastic_ep", new_size, generation,
                                                    timeout=_CALL_TIMEOUT) for r in ranks))
        except Exception as e:
            raise APIError(500, f"Scale failed while the engines re-formed their group: {e}") from None


def add_routes(app, client, metrics, in_flight) -> None:
    """POST /scale_elastic_ep, /scale (the PR's first name) and /is_scaling_elastic_ep; the bound on the
    requests that wait during a scale (scale_admission.py)."""
    from epplat.core.server.scale_admission import ScaleAdmission
    par = getattr(getattr(client, "cfg", None), "parallel", None)
    state = ({"scaler": ElasticScaler(client, metrics)} if par is not None and par.enable_elastic_ep
             and not par.external_lb else {})
    app.add_middleware(ScaleAdmission, scaler=lambda: state.get("scaler"), in_flight=in_flight)

    def scaler() -> ElasticScaler:
        if "scaler" not in state and par is not None and par.enable_elastic_ep:
            raise APIError(400, "With external load balancing a server started with --data-parallel-rank joins the "
                                "group and one stopped (SIGTERM) leaves it: there is no scale call")
        if "scaler" not in state:
            raise APIError(400, "This server was not started with --enable-elastic-ep")
        return state["scaler"]

    async def scale_elastic_ep(raw: Request):
        try:
            body = msgspec.json.decode(await raw.body())
        except msgspec.DecodeError:
            raise APIError(400, "Invalid JSON format") from None
        new_size, drain_timeout = parse_scale_body(body)
        return {"message": await scaler().scale(new_size, drain_timeout)}

    errors = {code: {"model": ErrorResponse, "description": what} for code, what in (
        (400, "Invalid body, or no --enable-elastic-ep"), (401, "Missing or wrong API key"),
        (408, "The drain timed out"), (409, "A scale is already running"), (413, "Request body too large"),
        (500, "The scale failed"), (503, "Engine not available"))}
    for path in ("/scale_elastic_ep", "/scale"):
        app.add_api_route(path, scale_elastic_ep, methods=["POST"], responses=errors,
                          summary="elastic EP: grow or shrink the data parallel engines (vLLM's body)")

    @app.post("/is_scaling_elastic_ep")
    async def is_scaling_elastic_ep():
        return {"is_scaling_elastic_ep": bool(state.get("scaler") and state["scaler"].scaling)}
