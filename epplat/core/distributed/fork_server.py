"""New engine processes of an elastic EP scale-up, forked from a fork server that paid for the imports once.

A spawned engine process pays for the interpreter and its imports (torch, transformers, epplat: 2-3 s
on CPU, most of a new rank's start) before it loads anything, and a scale-up waits for its slowest
new process. So `epplat serve --enable-elastic-ep` starts, beside its first engines, the standard
library's fork server (multiprocessing's "forkserver" start method) with fork_server_preload.py
preloaded: a process that imported what an engine process imports and started no process group,
device or thread pool, and forks each new engine process on request. A scale by any number of ranks
(every TP process of every new DP rank) costs one fork each, with no pool of spare processes to size
to the largest step (a flag) and nothing to start again after each scale. A child sets its own
device, core binding and thread count (run_engine_process, as a spawned one does); its environment is
the API server's as the fork server started. Over the fork server's Unix socket pass only file
descriptors; pids and exit codes come back on a pipe, and the child's arguments go to it through a
pipe, as with spawn.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import forkserver

_PRELOAD = "epplat.core.distributed.fork_server_preload"


def context():
    """multiprocessing's forkserver context, its server started (it imports in the background; the first
    fork waits for that). A server that died is started again."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([_PRELOAD])
    forkserver.ensure_running()
    return ctx


def run_forked_engine(cfg_json: bytes, rank: int, local_rank: int, ready_conn, join: dict | None) -> None:
    """A forked engine process: run_engine_process, dying with the fork server (its parent)."""
    from epplat.core.distributed import fork_server_preload
    from epplat.core.engine.core_proc import run_engine_process
    run_engine_process(cfg_json, rank, local_rank, ready_conn, fork_server_preload.SERVER_PID, join)
