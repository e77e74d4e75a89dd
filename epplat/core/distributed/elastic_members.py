"""Elastic EP with external load balancing: servers join and leave a running group through its store.

Each server runs one DP rank with its own API server (``--data-parallel-rank N``), so no API
server can call a scale. World rank 0's driver keeps the group's membership in the
deployment's TCPStore (which it serves): the members (the servers' --data-parallel-rank, in
DP-rank order), the last world generation, the KV blocks and expert slots of a rank. A
server started later finds that record, asks to join (a numbered request), gets its DP rank
(the next one) and a generation, starts its engines sized from the record (no profiling),
and says when they are loaded; rank 0 then runs the scale at a step every driver agrees
on (core_proc's waves: the others read the scale from the store). A server stopped with
SIGTERM first drains its HTTP requests, then asks to leave: its experts move to the others,
its engines exit, and the ranks above it move down one. Rank 0 answers every request in
the store; it does not leave (it serves the store).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import threading
import time

from epplat.config import ConfigError
from epplat.core.engine import protocol as P

logger = logging.getLogger(__name__)

_K = "epplat/elastic/"
POLL_S = 0.05              # how often rank 0 looks for requests
BEAT_S = 2.0               # a joining server's launcher says it is still loading this often
SILENCE_S = 30.0           # a reserved joiner silent this long (it died while loading) is given up


def _get(store, key: str):
    return json.loads(store.get(_K + key))


def _set(store, key: str, value) -> None:
    store.set(_K + key, json.dumps(value))


def _proof(secret: str, seq: int, index: int) -> str:
    return hmac.new(secret.encode(), f"{seq}/{index}".encode(), hashlib.blake2b).hexdigest()


class Head:
    """World rank 0's driver side: publishes the record and turns requests into scale calls."""

    def __init__(self, store, par, num_blocks: int, slots_per_rank: int):
        self.store, self.secret = store, par.internal_secret
        self.members = list(range(par.data_parallel_size))
        self.generation, self.seq, self.next_look = 0, 1, 0.0
        self.reserved = None          # (generation, index) of a joiner that is loading
        self.beats = (0, 0.0)         # its launcher's beats, and when they last changed
        self.running = None           # the scale call that runs, with what it changes
        _set(store, "record", {"blocks": num_blocks, "slots": slots_per_rank})
        self._publish()

    def _publish(self) -> None:
        _set(self.store, "state", {"members": self.members, "generation": self.generation})

    def poll(self):
        """A scale call to run now (P.UtilityCall), or None; at most every POLL_S."""
        now = time.monotonic()
        if self.running is not None or now < self.next_look:
            return None
        self.next_look = now + POLL_S
        if self.reserved is not None:
            generation, index = self.reserved
            if self.store.check([f"{_K}loaded/{generation}"]):
                self.reserved = None
                return self._start(len(self.members) + 1, generation, [], ("join", index))
            beats = self.store.add(f"{_K}loading/{generation}", 0)
            if beats != self.beats[0]:
                self.beats = (beats, now)
            if self.store.check([f"{_K}abandoned/{generation}"]) or now - self.beats[1] > SILENCE_S:
                logger.warning("elastic EP: DP rank %d (server %d) did not load; it is given up",
                               len(self.members), index)
                self.reserved = None
            return None
        if not self.store.check([f"{_K}request/{self.seq}"]):
            return None
        seq, req = self.seq, _get(self.store, f"request/{self.seq}")
        self.seq += 1
        return self._handle(seq, req)

    def _handle(self, seq: int, req: dict):
        index, op = req.get("index"), req.get("op")
        if not isinstance(index, int) or not hmac.compare_digest(str(req.get("proof")), _proof(self.secret, seq, index)):
            return self._answer(seq, error="refused: the request is not signed with this deployment's "
                                           "--internal-secret (EPPLAT_INTERNAL_SECRET)")
        if op == "join":
            if index in self.members:
                return self._answer(seq, error=f"--data-parallel-rank {index} is already in the group")
            self.generation += 1
            self.reserved, self.beats = (self.generation, index), (0, time.monotonic())
            return self._answer(seq, dp_rank=len(self.members), generation=self.generation,
                                size=len(self.members) + 1)
        if op == "leave":
            if index not in self.members:
                return self._answer(seq, error=f"--data-parallel-rank {index} is not in the group")
            if self.members.index(index) == 0:
                return self._answer(seq, error="DP rank 0 serves the group's store and cannot leave: stopping it "
                                               "stops the group")
            self.generation += 1
            self._answer(seq, dp_rank=self.members.index(index), generation=self.generation)
            return self._start(len(self.members) - 1, self.generation, [self.members.index(index)],
                               ("leave", index))
        return self._answer(seq, error=f"unknown request {op!r}")

    def _answer(self, seq: int, **answer) -> None:
        _set(self.store, f"answer/{seq}", answer)
        return None

    def _start(self, new_size: int, generation: int, leaving: list, change):
        _set(self.store, f"scale/{generation}", {"new_size": new_size, "leaving": leaving})
        self.running = (generation, change)
        logger.info("elastic EP: server %d %ss the group: %d -> %d DP ranks (world generation %d)", change[1],
                    change[0], len(self.members), new_size, generation)
        return P.UtilityCall(0, "scale_elastic_ep", [new_size, generation, leaving])

    def done(self, ok: bool) -> None:
        """The running scale finished (``ok``: the group is the new one)."""
        (generation, (op, index)), self.running = self.running, None
        if ok:
            self.members = self.members + [index] if op == "join" else [m for m in self.members if m != index]
            self._publish()
        self.store.set(f"{_K}done/{generation}", "ok" if ok else "failed")


def scale_call(store, generation: int):
    """A driver other than rank 0's: the scale call of ``generation`` that rank 0 runs."""
    spec = _get(store, f"scale/{generation}")
    return P.UtilityCall(0, "scale_elastic_ep", [spec["new_size"], generation, spec["leaving"]])


# -- the server's launcher ------------------------------------------------------------------
def _request(store, par, op: str, timeout: float) -> dict:
    seq = store.add(_K + "requests", 1)
    _set(store, f"request/{seq}", {"op": op, "index": par.data_parallel_rank,
                                   "proof": _proof(par.internal_secret, seq, par.data_parallel_rank)})
    deadline = time.monotonic() + timeout
    while not store.check([f"{_K}answer/{seq}"]):
        if time.monotonic() > deadline:
            raise ConfigError(f"DP rank 0 at {par.data_parallel_address}:{par.data_parallel_rpc_port} did not answer "
                              f"the {op} request in {timeout:g} s")
        time.sleep(0.02)
    answer = _get(store, f"answer/{seq}")
    if "error" in answer:
        raise ConfigError(f"elastic EP: cannot {op} the running group: {answer['error']}")
    return answer


def join_if_running(cfg):
    """(config, join) for this server's engines: a running group's record sized and numbered, and the join for
    start_engines; (cfg, None) when no group runs yet (this server is one of those that start it)."""
    from epplat.core.distributed.parallel_state import base_store
    par = cfg.parallel
    if par.data_parallel_rank == 0:
        return cfg, None
    store = base_store(par, timeout=par.distributed_timeout_seconds)
    if not store.check([_K + "state"]):
        if par.data_parallel_rank >= par.data_parallel_size:
            raise ConfigError(f"--data-parallel-rank {par.data_parallel_rank} must be below --data-parallel-size "
                              f"{par.data_parallel_size} (no running group to join at {par.data_parallel_address}:"
                              f"{par.data_parallel_rpc_port})")
        return cfg, None
    answer = _request(store, par, "join", timeout=120.0)
    record = _get(store, "record")
    new = type(cfg).from_json(cfg.to_json())
    new.parallel.data_parallel_size = answer["size"]
    new.parallel.eplb.num_redundant_experts = (record["slots"] * answer["size"] * par.tensor_parallel_size
                                               - _num_experts(cfg))
    new.cache.num_gpu_blocks_override = record["blocks"]      # the running ranks' size: no profiling
    logger.info("elastic EP: joining the running group as DP rank %d of %d (world generation %d)",
                answer["dp_rank"], answer["size"], answer["generation"])
    return new, {"generation": answer["generation"], "old_size": answer["dp_rank"], "dp_rank": answer["dp_rank"]}


def _num_experts(cfg) -> int:
    from epplat.core.model.registry import architecture
    hf = cfg.model.hf_config()
    return architecture(hf).parse_config(hf).num_experts


@contextlib.contextmanager
def loading(par, join: dict):
    """While the joining engines load, beat (on a store connection of its own) so rank 0 keeps the place."""
    import torch.distributed as dist
    stop = threading.Event()

    def beat():
        store = dist.TCPStore(par.data_parallel_address, par.data_parallel_rpc_port, None, False,
                              datetime.timedelta(seconds=10))
        while not stop.wait(BEAT_S):
            store.add(f"{_K}loading/{join['generation']}", 1)
    thread = threading.Thread(target=beat, daemon=True, name="epplat-join-beat")
    thread.start()
    try:
        yield
    finally:
        stop.set()


def loaded(par, join: dict, ok: bool) -> None:
    """The joining engines are loaded and wait to join (or failed to start: the reservation is given up)."""
    from epplat.core.distributed.parallel_state import base_store
    base_store(par).set(f"{_K}{'loaded' if ok else 'abandoned'}/{join['generation']}", "1")


def leave(cfg, procs, timeout: float = 120.0) -> None:
    """This server's engines leave the group (after its API server drained): wait until they have exited."""
    from epplat.core.distributed.parallel_state import base_store
    par = cfg.parallel
    if not procs or not all(p.is_alive() for p in procs):
        return
    try:
        store = base_store(par, timeout=10.0)
        answer = _request(store, par, "leave", timeout=timeout)
    except (ConfigError, RuntimeError) as e:
        logger.warning("%s", e)
        return
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    logger.info("elastic EP: DP rank %d (server %d) left the group (world generation %d)%s", answer["dp_rank"],
                par.data_parallel_rank, answer["generation"],
                "" if not any(p.is_alive() for p in procs) else "; its engines did not exit in time")
