"""The engine core process: receives requests over zmq, steps the engine, sends outputs.

It sleeps in a blocking poll while it has no work (no busy spinning) and exits when
its parent process disappears.
"""

from __future__ import annotations

import logging
import os
import signal
import traceback

import msgspec
import zmq

from epplat.config import ConfigError, EngineConfig
from epplat.core.engine import protocol as P
from epplat.logs import setup_logging
from epplat.plugins import PluginError, registry

logger = logging.getLogger(__name__)


def run_engine_core(cfg_json: bytes, engine_index: int, input_addr: str, output_addr: str, ready_conn) -> None:
    setup_logging()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    parent = os.getppid()
    cfg = EngineConfig.from_json(cfg_json)
    try:
        from epplat.core.engine.core import EngineCore
        platform = registry().load("platform", cfg.platform)()
        core = EngineCore(cfg, platform, platform.device(0))
    except (ConfigError, PluginError, ValueError, FileNotFoundError) as e:
        ready_conn.send_bytes(msgspec.json.encode({"error": str(e)}))
        return
    except Exception as e:
        logger.error("engine core failed to start:\n%s", traceback.format_exc())
        ready_conn.send_bytes(msgspec.json.encode({"error": f"{type(e).__name__}: {e}"}))
        return
    ready_conn.send_bytes(msgspec.json.encode({"max_model_len": core.max_model_len, "num_blocks": core.num_blocks,
                                               "vocab_size": core.runner.model_cfg.vocab_size}))
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.connect(input_addr)
    out = ctx.socket(zmq.PUSH)
    out.connect(output_addr)
    poller = zmq.Poller()
    poller.register(inp, zmq.POLLIN)
    try:
        _loop(core, engine_index, inp, out, poller, parent)
    except Exception as e:
        logger.error("engine core %d died:\n%s", engine_index, traceback.format_exc())
        out.send(P.encoder.encode(P.EngineDead(engine_index, f"{type(e).__name__}: {e}")))
        raise
    finally:
        out.close(linger=1000)
        inp.close(linger=0)


def _loop(core, idx, inp, out, poller, parent):
    while True:
        events = dict(poller.poll(0 if core.has_work() else 1000))
        if os.getppid() != parent:
            logger.warning("engine core %d: parent process is gone, exiting", idx)
            return
        if not events and not core.has_work():
            continue
        early: list[P.EngineOutput] = []
        while True:
            try:
                msg = P.input_decoder.decode(inp.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            if isinstance(msg, P.EngineRequest):
                core.add_request(msg)
            elif isinstance(msg, P.AbortRequests):
                early += core.abort(msg.request_ids)
            else:
                out.send(P.encoder.encode(_utility(core, msg)))
        outputs = early + core.step()
        if outputs:
            out.send(P.encoder.encode(P.EngineOutputs(idx, outputs, core.stats())))


def _utility(core, call: P.UtilityCall) -> P.UtilityResult:
    if call.method == "stats":
        return P.UtilityResult(call.call_id, msgspec.to_builtins(core.stats()))
    return P.UtilityResult(call.call_id, error=f"unknown utility method {call.method!r}")
