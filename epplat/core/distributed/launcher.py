"""Starts this node's engine processes (one per local DP rank x pipeline stage x TP rank) and stops them.

Processes are spawned with multiprocessing (or placed on a Ray cluster as actors: ray_launcher.py);
the new ones of an elastic EP scale-up are forked from a fork server that imported the engine once
(fork_server.py). Each reports over a pipe once its model and KV cache are ready (or the one-line
error that stopped it).
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
                  forked: bool = False) -> list[multiprocessing.Process]:
    """Spawn the local engine processes (of ``dp_ranks``, by default this node's) and wait until each is
    ready; ConfigError on failure. ``join``: they join running engines (elastic EP, core_proc); ``forked``:
    forked from the fork server (a scale-up's new ranks)."""
    par = cfg.parallel
    if par.uses_ray:                  # a scale-up's new ranks too, each in a placement group of its own
        from epplat.core.distributed.ray_launcher import start_ray_engines
        from epplat.plugins import registry
        return start_ray_engines(cfg, registry().load("platform", cfg.platform), timeout, dp_ranks, join)
    if dp_ranks is None:
        check_devices(cfg, len(par.local_dp_ranks()) * par.ranks_per_dp)
    if forked:
        from epplat.core.distributed import fork_server
        ctx, target = fork_server.context(), fork_server.run_forked_engine
    else:
        ctx, target = multiprocessing.get_context("spawn"), run_engine_process
    procs, conns = [], []
    raw = cfg.to_json()
    for d in (par.local_dp_ranks() if dp_ranks is None else dp_ranks):
        for j in range(par.ranks_per_dp):
            rank = d * par.ranks_per_dp + j
            local = rank if join and par.single_node else len(procs)   # one node: every rank's device
            pp, t = divmod(j, par.tensor_parallel_size)
            name = (f"EngineCore_DP{d}" + (f"_PP{pp}" if par.pipeline_parallel_size > 1 else "")
                    + (f"_TP{t}" if par.tensor_parallel_size > 1 else ""))
            parent, child = ctx.Pipe(duplex=False)
            args = (raw, rank, local, child, join) if forked else (raw, rank, local, child, os.getpid(), join)
            p = ctx.Process(target=target, args=args, daemon=True, name=name)
            try:
                p.start()
            except OSError as e:      # the fork server is gone: what was started stops
                stop_engines(procs)
                raise ConfigError(f"engine process {name} did not start: {e}") from None
            procs.append(p)
            conns.append(parent)
    deadline = time.time() + timeout
    try:
        for p, c in zip(procs, conns):
            while not c.poll(0.2):
                dead = [q for q in procs if not q.is_alive()]
                if dead:
                    raise _died(dead[0])
                if time.time() > deadline:
                    raise ConfigError("engine processes did not start in time")
            try:
                info = msgspec.json.decode(c.recv_bytes())
            except EOFError:        # it died before its ready line (the pipe's end closed with it)
                p.join(5)
                raise _died(p) from None
            if "error" in info:
                raise ConfigError(info["error"])
    except BaseException:
        stop_engines(procs)
        raise
    return procs


def _died(p) -> ConfigError:
    return ConfigError(f"engine process {p.name} exited with code {p.exitcode} during startup")


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
