"""Starts this node's engine processes (one per local DP rank x pipeline stage x TP rank) and stops them.

Processes are spawned with multiprocessing (or placed on a Ray cluster as actors: ray_launcher.py);
each reports over a pipe once its model and KV cache are ready (or the one-line error that stopped it).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time

import msgspec

from epplat.config import ConfigError, EngineConfig
from epplat.core.engine.core_proc import run_engine_process

logger = logging.getLogger(__name__)


def start_engines(cfg: EngineConfig, timeout: float = 900.0, dp_ranks=None, join: dict | None = None,
                  spares=()) -> list[multiprocessing.Process]:
    """Spawn the local engine processes (of ``dp_ranks``, by default this node's) and wait until each is
    ready; ConfigError on failure. ``join``: they join running engines (elastic EP, core_proc), the
    first ones from ``spares`` (SpareEngines, their imports paid) while there are any."""
    par = cfg.parallel
    if par.uses_ray:                  # a scale-up's new ranks too, each in a placement group of its own
        from epplat.core.distributed.ray_launcher import start_ray_engines
        from epplat.plugins import registry
        return start_ray_engines(cfg, registry().load("platform", cfg.platform), timeout, dp_ranks, join)
    if dp_ranks is None:
        check_devices(cfg, len(par.local_dp_ranks()) * par.ranks_per_dp)
    ctx = multiprocessing.get_context("spawn")
    procs, conns, spares = [], [], list(spares)
    raw = cfg.to_json()
    for d in (par.local_dp_ranks() if dp_ranks is None else dp_ranks):
        for j in range(par.ranks_per_dp):
            rank = d * par.ranks_per_dp + j
            local = rank if join and par.single_node else len(procs)   # one node: every rank's device
            pp, t = divmod(j, par.tensor_parallel_size)
            name = (f"EngineCore_DP{d}" + (f"_PP{pp}" if par.pipeline_parallel_size > 1 else "")
                    + (f"_TP{t}" if par.tensor_parallel_size > 1 else ""))
            if spares:
                p, parent = spares.pop(0).assign(raw, rank, local, join, name)
            else:
                parent, child = ctx.Pipe(duplex=False)
                p = ctx.Process(target=run_engine_process, args=(raw, rank, local, child, os.getpid(), join),
                                daemon=True, name=name)
                p.start()
            procs.append(p)
            conns.append(parent)
    deadline = time.time() + timeout
    try:
        for p, c in zip(procs, conns):
            while not c.poll(0.2):
                dead = [q for q in procs if not q.is_alive()]
                if dead:
                    raise ConfigError(f"engine process {dead[0].name} exited with code {dead[0].exitcode} "
                                      "during startup")
                if time.time() > deadline:
                    raise ConfigError("engine processes did not start in time")
            info = msgspec.json.decode(c.recv_bytes())
            if "error" in info:
                raise ConfigError(info["error"])
    except BaseException:
        stop_engines(procs)
        raise
    return procs


def check_devices(cfg: EngineConfig, local_procs: int) -> None:
    """ConfigError when this node would run more engine processes than its platform has devices."""
    from epplat.plugins import registry
    count = registry().load("platform", cfg.platform).device_count()
    if count is not None and local_procs > count:
        raise ConfigError(f"{local_procs} engine processes on this node (DP ranks x --tensor-parallel-size) but the "
                          f"{cfg.platform} platform has {count} devices here")


def stop_engines(procs, grace: float = 10.0) -> None:
    """Stop and reap each process. Engines ignore SIGTERM and SIGINT (a signal to the whole process
    group must not end them before the API server drained), hold nothing to flush, and may be
    stopped (SIGSTOP) or blocked in a collective: they get SIGKILL. Other children (API servers)
    get SIGTERM first and SIGKILL after `grace` seconds."""
    for p in procs:
        if p.is_alive():
            p.kill() if p.name.startswith("EngineCore") else p.terminate()
    deadline = time.time() + grace
    for p in procs:
        p.join(max(0.1, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join(1)
