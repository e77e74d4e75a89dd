"""Engine processes: one per (DP rank, pipeline stage, TP rank). The first stage's TP-rank-0
process of a DP rank (the driver) runs the scheduler and talks to the API servers over zmq; the
other ranks run their part of each step the driver sends them. With pipeline stages the driver
keeps up to pipeline-parallel-size steps in flight (of different requests), so stages do not idle.

With expert parallelism over several DP ranks, MoE layers are collective, so all
drivers step together in "waves": an engine that gets work while idle wakes every
other engine through the wake channel (a PUSH->PUB forwarder in world rank 0); in
each step the drivers all-gather (has_work, num_tokens); ranks without work run an
empty forward; when no rank has work the wave ends and every engine sleeps in a
blocking poll (no busy spinning). Engines exit when their launcher or world rank 0
goes away (the kernel kills them with their launcher; an API server that stops reading
ends them through the send timeout), and heartbeat to the API servers while they live.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections import deque

import msgspec
import torch
import torch.distributed as dist
import zmq

from epplat.config import ConfigError, EngineConfig
from epplat.core.distributed.lifeline import die_with_parent
from epplat.core.distributed.parallel_state import ParallelState, init_parallel
from epplat.core.engine import protocol as P
from epplat.core.engine.frame_auth import BadFrame, FrameAuth, listen
from epplat.logs import setup_logging
from epplat.plugins import PluginError, registry

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 1000
HEARTBEAT_S = 1.0
SEND_TIMEOUT_MS = 30_000   # an API server that reads nothing for this long is gone: the engine exits
_KV_POLL_MS = 2          # while KV transfers are in flight, their completion is polled this often
_STORE_KEY = "epplat/api_server_count"


class PeerGone(RuntimeError):
    """An API server stopped reading this engine's outputs."""


def run_engine_process(cfg_json: bytes, rank: int, local_rank: int, ready_conn, parent_pid: int,
                       join: dict | None = None) -> None:
    """Entry point of every engine process (spawned by the launcher; ``parent_pid`` None: in a Ray actor, which
    Ray ends with its job). ``join``: this rank joins running ones (elastic EP: {"generation": g, "old_size": n})
    once its model and KV cache are ready."""
    if parent_pid is not None:
        die_with_parent(parent_pid)
    setup_logging()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):   # the launcher decides when we stop (after its drain)
            signal.signal(sig, signal.SIG_IGN)
    cfg = EngineConfig.from_json(cfg_json)
    try:
        from epplat.core.engine.core import EngineCore, init_kv_cache
        from epplat.core.engine.model_runner import ModelRunner
        platform = registry().load("platform", cfg.platform)()
        platform.configure(cfg)
        device = platform.device(local_rank)
        par = cfg.parallel
        tp = par.tensor_parallel_size
        ps = (init_parallel(par, rank, platform.dist_backend) if join is None else   # joins later, in elastic.join
              ParallelState(rank=rank, world_size=par.world_size, tp_rank=rank % tp, tp_size=tp, dp_rank=rank // tp,
                            dp_size=par.data_parallel_size, ep=par.enable_expert_parallel))
        platform.max_threads = _share_threads(_local_procs(cfg))
        runner = ModelRunner(cfg, platform, device, ps)
        if ps.is_driver:
            core = EngineCore(cfg, platform, device, ps, runner)
        else:
            init_kv_cache(runner, cfg, ps)
    except (ConfigError, PluginError, ValueError, FileNotFoundError) as e:
        ready_conn.send_bytes(msgspec.json.encode({"error": str(e)}))
        return
    except Exception as e:
        logger.error("engine process %d failed to start:\n%s", rank, traceback.format_exc())
        ready_conn.send_bytes(msgspec.json.encode({"error": f"{type(e).__name__}: {e}"}))
        return
    wave = 0
    if join is not None:
        from epplat.core.engine import elastic
        elastic.fault_point("start", join["generation"])
    ready_conn.send_bytes(msgspec.json.encode({"ok": rank}))
    if join is not None:
        wave = elastic.join(runner, ps, join["generation"], join["old_size"])
    watch = _Liveness(ps)
    if not ps.is_driver:
        _worker_loop(runner, cfg, ps, watch)
        return
    io = _DriverIO(cfg, ps, core)
    io.wave = wave
    try:
        _driver_loop(core, io, ps, watch)
    except PeerGone as e:
        logger.error("engine (DP rank %d): %s; exiting", ps.dp_rank, e)
        raise SystemExit(1) from None
    except Exception as e:
        logger.error("engine (DP rank %d) died:\n%s", ps.dp_rank, traceback.format_exc())
        try:
            io.broadcast(P.EngineDead(io.index, f"{type(e).__name__}: {e}"))
        except PeerGone:
            pass
        raise
    finally:
        io.close()
    if io.left:
        _exit_now()


def _exit_now() -> None:
    """A rank that left its group (elastic EP) exits once its last frames are sent (its reply to the scale
    call: zmq's context delivers them as it ends, within 2 s here), without the interpreter's own teardown
    (the old world, the threads), which took seconds that its launcher waits for."""
    logging.shutdown()
    ending = threading.Thread(target=zmq.Context.instance().term, daemon=True)
    ending.start()
    ending.join(2.0)
    os._exit(0)


_ALL_THREADS = torch.get_num_threads()   # the machine's, before this process takes its share


def _share_threads(local_procs: int) -> int:
    """This process's share of the machine's threads among ``local_procs`` engine processes."""
    share = _ALL_THREADS // max(1, local_procs)
    torch.set_num_threads(max(1, min(share, len(os.sched_getaffinity(0)))))     # a bound process: its cores
    return torch.get_num_threads()


def _local_procs(cfg: EngineConfig) -> int:
    return len(cfg.parallel.local_dp_ranks()) * cfg.parallel.ranks_per_dp


def _engine_index(par, ps: ParallelState) -> int:
    """The DP rank's name towards its API server and TP workers: its --data-parallel-rank with external load
    balancing (fixed, while elastic EP may renumber the DP rank), else the DP rank."""
    return par.data_parallel_rank if par.external_lb else ps.dp_rank


class _Liveness:
    """Tells an idle engine to exit when its launcher or world rank 0 (the store) is gone."""

    def __init__(self, ps: ParallelState):
        self.parent = os.getppid()
        self.store = dist.distributed_c10d._get_default_store() if ps.world_size > 1 and ps.rank else None
        self.last = time.monotonic()

    def alive(self) -> bool:
        if os.getppid() != self.parent:
            logger.warning("engine: launcher process is gone, exiting")
            return False
        if self.store is not None and time.monotonic() - self.last > 2:
            self.last = time.monotonic()
            try:
                self.store.check([_STORE_KEY])
            except Exception:
                logger.warning("engine: world rank 0 is gone, exiting")
                return False
        return True


# -- TP workers ----------------------------------------------------------------------------
_plan_decoder = None


def _worker_loop(runner, cfg, ps, watch) -> None:
    from epplat.core.engine.elastic import Rescale
    from epplat.core.engine.model_runner import DraftInput, KVLoad, ModelInput
    decoder = msgspec.msgpack.Decoder(ModelInput | DraftInput | KVLoad | Rescale)
    auth = FrameAuth(cfg.parallel.internal_secret)
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.connect(cfg.parallel.driver_endpoint(_engine_index(cfg.parallel, ps), "plan", ps.pp_rank * ps.tp_size + ps.tp_rank))
    while True:
        busy = runner.kv_busy()
        if busy:
            runner.kv_connector.get_finished()      # a TP worker's connector reports to its driver's
        if not sock.poll(_KV_POLL_MS if busy else _IDLE_POLL_MS):
            if not watch.alive():
                return
            continue
        try:
            plan = auth.decode(decoder, sock.recv())
        except BadFrame as e:
            auth.dropped("the step plan socket", e)
            continue
        if isinstance(plan, Rescale):
            if not _worker_rescale(runner, ps, plan, watch):
                sock.close(linger=0)
                _exit_now()
        elif isinstance(plan, KVLoad):
            runner.kv_start_load(plan.kv_meta)
        else:
            (runner.draft_forward if isinstance(plan, DraftInput) else runner.forward)(plan)


def _worker_rescale(runner, ps, plan, watch) -> bool:
    """A TP worker's part of its driver's scale call; False when its DP rank leaves."""
    from epplat.core.distributed.elastic_world import JoinAborted, ScaleRolledBack
    from epplat.core.engine import elastic
    try:
        stays = elastic.rescale(runner, ps, plan.new_size, plan.generation, plan.wave, plan.leaving)
    except JoinAborted:
        return True
    except ScaleRolledBack:
        stays = True
    if stays:
        _rejoined(runner, ps, watch)
    return stays


def _rejoined(runner, ps, watch: _Liveness) -> None:
    """After this process joined a world of another size: its share of the threads, the store it watches."""
    par = runner.cfg.parallel     # one node: the new world's processes share it; else this node's stay
    runner.platform.max_threads = _share_threads(ps.world_size if par.single_node else _local_procs(runner.cfg))
    watch.store = dist.distributed_c10d._get_default_store() if ps.rank else None


# -- drivers -------------------------------------------------------------------------------
class _DriverIO:
    """The driver's sockets: API servers (DEALER in, PUSH out), TP workers, DP wake channel."""

    def __init__(self, cfg: EngineConfig, ps: ParallelState, core):
        par = cfg.parallel
        self.ps, self.core = ps, core
        self.auth = FrameAuth(par.internal_secret)
        self.last_beat = 0.0
        self.load_told = (0, 0)         # (running, waiting) as the API servers last heard it
        self.ctx = zmq.Context.instance()
        self.poller = zmq.Poller()
        n_api = 1 if par.external_lb else _api_server_count(par, ps)
        self.index = _engine_index(par, ps)
        indices = [self.index] if par.external_lb else list(range(n_api))
        self.dealers, self.outs = [], []
        for i in indices:
            router, pull = par.api_endpoints(i)
            d = self.ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.IDENTITY, f"engine-{self.index}".encode())
            d.connect(router)
            o = self.ctx.socket(zmq.PUSH)
            o.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
            o.connect(pull)
            self.dealers.append(d)
            self.outs.append(o)
            self.poller.register(d, zmq.POLLIN)
        self.workers = []
        self.in_flight: deque = deque()   # launched steps not yet completed (pipeline parallelism)
        for t in range(1, ps.pp_size * ps.tp_size):
            w = self.ctx.socket(zmq.PUSH)
            listen(w, par.driver_endpoint(self.index, "plan", t))
            self.workers.append(w)
        core.tp_publish = self.publish if self.workers else None
        self.waves = ps.ep and ps.dp_size > 1
        self.wakes: set[int] = set()
        self.wave = 0                     # waves run so far (the same on every DP rank)
        self.scale = None                 # a scale_elastic_ep call not yet run (elastic EP)
        self.left = False                 # this rank left its group (elastic EP)
        self.wake_in = None
        if self.waves:
            self._setup_wake_channel(par)
        self.head = self.group_store = None    # elastic EP, external LB: the membership (elastic_members.py)
        self.idle_ms = _IDLE_POLL_MS
        if par.enable_elastic_ep and par.external_lb:
            from epplat.core.distributed import elastic_members
            from epplat.core.distributed.parallel_state import base_store
            self.group_store = base_store(par)
            if ps.rank == 0:
                self.head = elastic_members.Head(self.group_store, par, core.num_blocks,
                                                 core.runner.all2all.expert_map.num_local)
                self.idle_ms = int(elastic_members.POLL_S * 1000)
        ready = P.EngineReady(self.index, core.max_model_len, core.runner.model_cfg.vocab_size, core.num_blocks)
        for d in self.dealers:
            d.send(self.auth.seal(P.encoder.encode(ready)))
        logger.info("engine (DP rank %d, pid %d) ready, serving %d API server(s)", self.index, os.getpid(),
                    len(self.dealers))

    def _setup_wake_channel(self, par) -> None:
        pull_addr, pub_addr = par.wake_endpoints()
        if self.ps.dp_rank == 0:
            args = (self.ctx, pull_addr, pub_addr, FrameAuth(par.internal_secret))
            threading.Thread(target=_wake_forwarder, args=args, daemon=True).start()
        self.wake_out = self.ctx.socket(zmq.PUSH)
        self.wake_out.connect(pull_addr)
        self.wake_in = self.ctx.socket(zmq.SUB)
        self.wake_in.setsockopt(zmq.SUBSCRIBE, b"")
        self.wake_in.connect(pub_addr)
        # prove the subscription is live (PUB drops messages for late joiners) before serving
        hello = P.Wake(-1 - self.ps.dp_rank, self.ps.dp_rank)
        while True:
            self.wake_out.send(self.auth.seal(P.encoder.encode(hello)))
            if self.wake_in.poll(50) and any(w == hello for w in self._drain_wake()):
                break
        dist.barrier(group=self.ps.dp_group)
        self.poller.register(self.wake_in, zmq.POLLIN)

    def _drain_wake(self):
        """The authentic wake messages that arrived."""
        while True:
            try:
                raw = self.wake_in.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                yield self.auth.decode(P.wake_decoder, raw)
            except BadFrame as e:
                self.auth.dropped("the wake channel", e)

    def poll(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms for input, then handle everything that arrived; heartbeat."""
        self.beat()
        if self.head is not None and self.scale is None:
            self.scale = self.head.poll()
        if not self.poller.poll(timeout_ms):
            self.beat()
            return
        for d in self.dealers:
            while True:
                try:
                    raw = d.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = self.auth.decode(P.input_decoder, raw)
                except BadFrame as e:
                    self.auth.dropped("the engine input socket", e)
                    continue
                self._handle(msg)
        if self.waves:
            for w in self._drain_wake():
                if w.wave >= 0:
                    self.wakes.add(w.wave)

    def beat(self) -> None:
        """Tell the API servers this engine's loop is alive (at most every HEARTBEAT_S)."""
        now = time.monotonic()
        if now - self.last_beat >= HEARTBEAT_S:
            self.last_beat = now
            self.broadcast(P.EngineHeartbeat(self.index))

    def _handle(self, msg) -> None:
        core = self.core
        if isinstance(msg, P.EngineRequest):
            self.send_outputs(core.add_request(msg))
        elif isinstance(msg, P.AbortRequests):
            self.send_outputs(core.abort(msg.request_ids))
        elif msg.method == "scale_elastic_ep" and self.core.cfg.parallel.enable_elastic_ep:
            self.scale = msg              # run by every driver at a step they agree on (_run_wave)
        elif msg.method == "hand_off_requests" and self.core.cfg.parallel.enable_elastic_ep:
            outputs, moved = core.hand_off()      # this rank leaves: its outputs so far go before the moved
            self.send_outputs(outputs)
            self._send(msg.client_index, P.UtilityResult(msg.call_id, moved))
        elif msg.method == "stats":
            self._send(msg.client_index, P.UtilityResult(msg.call_id, msgspec.to_builtins(core.stats())))
        else:
            self._send(msg.client_index, P.UtilityResult(msg.call_id, error=f"unknown method {msg.method!r}"))

    def woken(self, wave: int) -> bool:
        self.wakes = {w for w in self.wakes if w >= wave}
        return wave in self.wakes

    def send_wake(self, wave: int) -> None:
        self.wake_out.send(self.auth.seal(P.encoder.encode(P.Wake(wave, self.ps.dp_rank))))

    def publish(self, mi) -> None:
        raw = self.auth.seal(P.encoder.encode(mi))
        for w in self.workers:
            w.send(raw)

    def send_outputs(self, outputs) -> None:
        if not outputs:
            return
        by_client: dict[int, list] = {}
        for o in outputs:
            idx = self.core.client_of.get(o.request_id, 0)
            if o.finish_reason:
                self.core.client_of.pop(o.request_id, None)
            by_client.setdefault(idx, []).append(o)
        stats = self.core.stats()
        for idx, outs in by_client.items():
            self._send(idx, P.EngineOutputs(self.index, outs, stats))
        load = (stats.num_running, stats.num_waiting)
        if load != self.load_told:      # every API server routes on it, also one with no request here
            self.load_told = load
            told = {self._out(idx) for idx in by_client}
            for o in self.outs:
                if o not in told:
                    self._push(o, P.EngineOutputs(self.index, [], stats))

    def _out(self, client_index: int):
        return self.outs[0] if len(self.outs) == 1 else self.outs[client_index]

    def _send(self, client_index: int, msg) -> None:
        self._push(self._out(client_index), msg)

    def broadcast(self, msg) -> None:
        for o in self.outs:
            self._push(o, msg)

    def _push(self, out, msg) -> None:
        try:
            out.send(self.auth.seal(P.encoder.encode(msg)))
        except zmq.Again:
            raise PeerGone(f"an API server read nothing for {SEND_TIMEOUT_MS // 1000} s") from None

    def rescaled(self, watch: "_Liveness") -> None:
        """After this rank joined a world of another size: the store key, the wake channel, the waves."""
        ps = self.ps
        _rejoined(self.core.runner, ps, watch)
        store = dist.distributed_c10d._get_default_store()
        if ps.rank == 0:
            store.set(_STORE_KEY, str(len(self.dealers)))
        self.waves = ps.ep and ps.dp_size > 1
        self.wakes.clear()
        if self.waves and self.wake_in is None:
            self._setup_wake_channel(self.core.cfg.parallel)
        elif self.waves:
            if self.wake_in not in dict(self.poller.sockets):
                self.poller.register(self.wake_in, zmq.POLLIN)
            dist.barrier(group=ps.dp_group)     # the new ranks' _setup_wake_channel ends with it
        elif self.wake_in is not None and self.wake_in in dict(self.poller.sockets):
            self.poller.unregister(self.wake_in)

    def close(self) -> None:
        for s in self.dealers + self.outs + self.workers:
            s.close(linger=500)
        for s in (self.wake_in, getattr(self, "wake_out", None)):
            if s is not None:
                s.close(linger=0)


def _api_server_count(par, ps: ParallelState) -> int:
    """API servers run on the primary node; world rank 0 tells headless nodes how many."""
    if ps.world_size == 1:
        return par.api_server_count
    store = dist.distributed_c10d._get_default_store()
    if ps.rank == 0:
        store.set(_STORE_KEY, str(par.api_server_count))
    return int(store.get(_STORE_KEY))


def _wake_forwarder(ctx, pull_addr: str, pub_addr: str, auth: FrameAuth) -> None:
    """PULL -> PUB, forwarding authentic frames only (a stranger's are dropped, with the stranger)."""
    pull, pub = ctx.socket(zmq.PULL), ctx.socket(zmq.PUB)
    listen(pull, pull_addr)
    listen(pub, pub_addr)
    try:
        while True:
            frame = pull.recv(copy=False)
            try:
                auth.open(frame)
            except BadFrame as e:
                auth.dropped("the wake channel", e, frame)
                continue
            pub.send(frame)
    except zmq.ContextTerminated:
        pass


def _driver_loop(core, io: _DriverIO, ps: ParallelState, watch: _Liveness) -> None:
    while True:
        io.poll(0 if core.has_work() or io.scale else _KV_POLL_MS if core.kv_pending() else io.idle_ms)
        core.poll_kv()
        io.send_outputs(core.poll_grammars())
        if not io.waves:
            if io.scale is not None:
                if not _rescale(core, io, ps, watch):
                    return
            elif core.has_work() and ps.pp_size > 1:
                _pipeline_step(core, io, ps.pp_size)
            elif core.has_work():
                io.send_outputs(core.step(publish=io.publish if io.workers else None))
            elif not watch.alive():
                return
            continue
        woken = io.woken(io.wave)
        if not core.has_work() and not woken and io.scale is None:
            if not watch.alive():
                return
            continue
        if not woken:
            io.send_wake(io.wave)
        scale = _run_wave(core, io, ps)
        io.wave += 1
        if scale and not _rescale(core, io, ps, watch):
            return


def _pipeline_step(core, io: _DriverIO, depth: int) -> None:
    """Launch steps until ``depth`` are in flight (or nothing more can be scheduled), then complete the oldest.
    Each step takes at most 1/depth of the requests, so that every stage has a step to work on."""
    sched = core.scheduler
    while len(io.in_flight) < depth:
        batch = core.schedule(-(-(len(sched.running) + len(sched.waiting)) // depth))
        step = core.launch(batch, publish=io.publish) if batch else None
        if step is None:
            break
        io.in_flight.append(step)
    if io.in_flight:
        io.send_outputs(core.complete(io.in_flight.popleft()))


def _run_wave(core, io: _DriverIO, ps: ParallelState) -> bool:
    """Step in lockstep with every DP rank until none has work; True when every rank got the same
    scale call (elastic EP), which then runs after this step on all of them."""
    flags = torch.zeros(3, dtype=torch.long)
    gathered = [torch.zeros(3, dtype=torch.long) for _ in range(ps.dp_size)]
    while True:
        io.poll(0)
        io.send_outputs(core.poll_grammars())
        io.send_outputs(core.before_schedule())
        has_work = core.has_work()
        batch = core.schedule() if has_work else []
        flags[0], flags[1] = int(has_work), sum(n for _, n in batch)
        flags[2] = io.scale.args[1] if io.scale is not None else 0       # the scale's world generation
        dist.all_gather(gathered, flags, group=ps.dp_group)
        if io.scale is None and io.group_store is not None and int(gathered[0][2]) > 0:
            from epplat.core.distributed.elastic_members import scale_call
            io.scale = scale_call(io.group_store, int(gathered[0][2]))     # rank 0 runs a join or a leave
        scale = len({int(g[2]) for g in gathered}) == 1 and int(gathered[0][2]) > 0
        if not any(int(g[0]) or int(g[2]) for g in gathered):
            return False
        ep_counts = [int(g[1]) for g in gathered for _ in range(ps.tp_size)]
        io.send_outputs(core.run(batch, ep_counts, io.publish if io.workers else None))
        if scale:
            return True


def _rescale(core, io: _DriverIO, ps: ParallelState, watch: _Liveness) -> bool:
    """Run the scale call every rank agreed on; False when this rank left the group."""
    from epplat.core.distributed.elastic_world import JoinAborted, ScaleRolledBack
    from epplat.core.engine import elastic
    call, io.scale = io.scale, None
    new_size, generation, *rest = call.args
    leaving = rest[0] if rest else []
    t0 = time.perf_counter()
    if io.workers:
        io.publish(elastic.Rescale(new_size, generation, io.wave, leaving))     # its TP workers run it beside it
    try:
        stays = elastic.rescale(core.runner, ps, new_size, generation, io.wave, leaving)
    except (JoinAborted, ScaleRolledBack) as e:     # this rank serves on in its world (the old one re-formed)
        logger.error("elastic EP: scale to %d DP ranks aborted: %s", new_size, e)
        if isinstance(e, ScaleRolledBack):
            io.rescaled(watch)
        if io.head is not None:
            io.head.done(ok=False)
        io._send(call.client_index, P.UtilityResult(call.call_id, error=str(e)))
        return True
    except Exception as e:
        io._send(call.client_index, P.UtilityResult(call.call_id, error=f"{type(e).__name__}: {e}"))
        raise
    if stays:
        io.rescaled(watch)
    io.left = not stays
    if io.head is not None:
        io.head.done(ok=True)
    io._send(call.client_index, P.UtilityResult(call.call_id, {"stays": stays, "seconds": time.perf_counter() - t0}))
    return stays
