"""A spare engine process for elastic EP: started ahead of a scale-up, it has paid for the
interpreter and the imports (most of a new rank's start on CPU) and waits for its rank and config.

The API server keeps one per TP rank (a DP rank's processes); a scale-up hands them the first
new DP rank's processes (launcher.start_engines) and starts the next spares after. A spare that is never used dies with its launcher.
"""

from __future__ import annotations

import multiprocessing
import os

import msgspec


class SpareEngine:
    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        self.args_in, self.args_out = ctx.Pipe(duplex=False)
        self.ready_in, ready_out = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_wait_for_rank, args=(self.args_in, ready_out, os.getpid()), daemon=True,
                                name="EngineCore_spare")
        self.proc.start()

    def assign(self, cfg_json: bytes, rank: int, local_rank: int, join: dict, name: str):
        """Give the spare its rank; returns (process, the pipe its ready line comes on)."""
        self.args_out.send_bytes(msgspec.json.encode({"cfg": cfg_json.decode(), "rank": rank, "local": local_rank,
                                                      "join": join, "name": name}))
        self.proc.name = name
        return self.proc, self.ready_in

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)


def _wait_for_rank(args_in, ready_out, parent_pid: int) -> None:
    from epplat.core.distributed.lifeline import die_with_parent
    die_with_parent(parent_pid)
    # what a new rank would wait for: the engine, transformers' config reader, the plugins
    from epplat.core.engine import core, model_runner  # noqa: F401
    from epplat.core.engine.core_proc import run_engine_process
    from epplat.plugins import registry
    from transformers import AutoConfig  # noqa: F401
    registry()
    try:
        msg = msgspec.json.decode(args_in.recv_bytes())
    except EOFError:            # the API server went away first
        return
    multiprocessing.current_process().name = msg["name"]
    run_engine_process(msg["cfg"].encode(), msg["rank"], msg["local"], ready_out, parent_pid, msg["join"])
