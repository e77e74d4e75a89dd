"""Tensor parallelism on either side of a KV transfer: which KV heads a TP rank holds, which ranks of
the other side a decode rank reads (vLLM's heterogeneous TP: any two TP sizes, the heads split
evenly on both), and the ipc socket over which a DP rank's TP workers report to their driver (the
driver alone answers the engine core: a request is received once every rank has read its heads, and
held blocks are freed once every rank's readers are done).
"""

from __future__ import annotations

import collections
import tempfile
import time

import msgspec
import zmq

from epplat.core.engine.frame_auth import BadFrame


def head_range(total: int, tp: int, rank: int) -> tuple[int, int]:
    """The KV heads [start, stop) TP rank `rank` of `tp` holds (heads replicated when fewer than tp)."""
    per = max(1, total // tp)
    start = rank * per if total >= tp else rank // (tp // total)
    return start, start + per


def sources(mine: tuple[int, int], remote: list[tuple[int, int]], rank: int) -> list[int]:
    """The remote ranks a local rank holding heads `mine` reads: one per distinct remote head range that
    overlaps `mine` (of ranks holding the same heads, the one at this rank's index among them)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for r, heads in enumerate(remote):
        if max(mine[0], heads[0]) < min(mine[1], heads[1]):
            groups.setdefault(tuple(heads), []).append(r)
    return [ranks[rank % len(ranks)] for ranks in groups.values()]


def readers(total: int, local_tp: int, remote: list[tuple[int, int]]) -> list[int]:
    """How many local ranks read each remote rank (0 for a rank whose heads another replica serves)."""
    count = collections.Counter(r for d in range(local_tp)
                                for r in sources(head_range(total, local_tp, d), remote, d))
    return [count[r] for r in range(len(remote))]


class TPReports:
    """A DP rank's TP workers (PUSH) and their driver (PULL) on one ipc socket, sealed with the deployment's
    secret: at start the workers send the driver what it must publish for them; then each worker sends the
    request ids its reads finished (done or failed) and the ids whose held blocks it may free."""

    def __init__(self, where: str, tp_size: int, tp_rank: int, auth):
        self.tp_size, self.tp_rank, self.auth = tp_size, tp_rank, auth
        self.sock = zmq.Context.instance().socket(zmq.PULL if tp_rank == 0 else zmq.PUSH)
        (self.sock.bind if tp_rank == 0 else self.sock.connect)(where)
        self.loads: dict[str, list] = {}         # driver: request id -> [ranks that reported, any failed]
        self.sends: collections.Counter = collections.Counter()

    @classmethod
    def of(cls, engine, dp_rank: int, tp_rank: int, auth) -> "TPReports":
        """The socket of this engine's DP rank `dp_rank`."""
        par = engine.parallel
        where = f"ipc://{par.ipc_dir or tempfile.gettempdir()}/kv-reads-dp{dp_rank}-{par.data_parallel_rpc_port}"
        return cls(where, par.tensor_parallel_size, tp_rank, auth)

    def _send(self, msg: dict) -> None:
        self.sock.send(self.auth.seal(msgspec.msgpack.encode(msg)))

    def _recv(self, timeout_ms: int):
        if not self.sock.poll(timeout_ms):
            return None
        try:
            msg = self.auth.decode(msgspec.msgpack.Decoder(dict), self.sock.recv())
        except BadFrame as e:
            self.auth.dropped("the KV TP reports socket", e)
            return {}
        return msg

    def exchange(self, info: dict, timeout_s: float = 120.0) -> list[dict]:
        """Every rank's `info`, by rank, on the driver (a worker sends its own and gets [])."""
        if self.tp_rank > 0:
            self._send({"rank": self.tp_rank, "info": info})
            return []
        infos = {0: info}
        deadline = time.monotonic() + timeout_s
        while len(infos) < self.tp_size:
            msg = self._recv(max(1, int((deadline - time.monotonic()) * 1000)))
            if msg is None:
                raise RuntimeError(f"KV connector: TP ranks {sorted(set(range(self.tp_size)) - set(infos))} did "
                                   f"not report in {timeout_s:.0f} s")
            if isinstance(msg.get("rank"), int) and isinstance(msg.get("info"), dict):
                infos[msg["rank"]] = msg["info"]
        return [infos[r] for r in range(self.tp_size)]

    def collect(self, done: set[str], failed: set[str], sent: set[str]) -> tuple[set[str], set[str], set[str]]:
        """This rank's finished reads (done, failed) and freeable held requests: a worker sends them to the
        driver and gets nothing back; the driver gets what every rank has finished (gather)."""
        if self.tp_rank == 0:
            return self.gather(done, failed, sent)
        if done or failed or sent:
            self._send({"done": sorted(done), "failed": sorted(failed), "sent": sorted(sent)})
        return set(), set(), set()

    def gather(self, done: set[str], failed: set[str], sent: set[str]) -> tuple[set[str], set[str], set[str]]:
        """The driver: (received, failed, freeable) over all ranks, given its own."""
        reports = [{"done": done, "failed": failed, "sent": sent}]
        while (msg := self._recv(0)) is not None:
            if msg and all(isinstance(msg.get(k), list) for k in ("done", "failed", "sent")):
                reports.append(msg)
        for rep in reports:
            for rid in set(rep["done"]) | set(rep["failed"]):
                state = self.loads.setdefault(rid, [0, False])
                state[0] += 1
                state[1] = state[1] or rid in rep["failed"]
            self.sends.update(set(rep["sent"]))
        received, bad = set(), set()
        for rid, (ranks, failed_somewhere) in list(self.loads.items()):
            if ranks == self.tp_size:
                del self.loads[rid]
                (bad if failed_somewhere else received).add(rid)
        freeable = {rid for rid, n in self.sends.items() if n >= self.tp_size}
        for rid in freeable:
            del self.sends[rid]
        return received, bad, freeable

    def close(self) -> None:
        self.sock.close(linger=0)
