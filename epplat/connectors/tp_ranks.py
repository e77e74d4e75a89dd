"""Tensor and pipeline parallelism on either side of a KV transfer: which KV heads a TP rank holds and
which layers its pipeline stage holds, which ranks of the other side a decode rank reads (vLLM's
heterogeneous TP: any two TP sizes, the heads split evenly on both; any two stage counts, each rank
reading the layers it holds from the stages that hold them), and the socket (ipc on one node, tcp across nodes) over which a DP rank's workers (every stage's TP ranks) report to their driver (the
driver alone answers the engine core: a request is received once every rank has read its heads, and
held blocks are freed once every rank's readers are done).
"""

from __future__ import annotations

import collections
import time

import msgspec
import zmq

from epplat.core.engine.frame_auth import BadFrame, listen


def head_range(total: int, tp: int, rank: int) -> tuple[int, int]:
    """The KV heads [start, stop) TP rank `rank` of `tp` holds (heads replicated when fewer than tp)."""
    per = max(1, total // tp)
    start = rank * per if total >= tp else rank // (tp // total)
    return start, start + per


def rank_layers(engine, pp_rank: int, local_layers: int) -> tuple[int, int]:
    """The layers [start, stop) whose KV cache pipeline stage `pp_rank` holds (`local_layers` of them)."""
    pp = engine.parallel.pipeline_parallel_size
    if pp == 1:
        return 0, local_layers
    from epplat.core.distributed.pipeline import layer_range
    return layer_range(total_layers(engine, local_layers), pp_rank, pp)


def total_layers(engine, local_layers: int) -> int:
    """The model's layers with a KV cache (the stages' together); `local_layers` without pipeline stages."""
    if engine.parallel.pipeline_parallel_size == 1:
        return local_layers
    return int(engine.model.hf_config()["num_hidden_layers"])


def rank_parts(engine, total_heads: int, local_layers: int) -> list[tuple]:
    """What each rank of a DP rank holds, by local rank (pp_rank * TP + tp_rank): (its KV heads, its layers)."""
    par = engine.parallel
    tp, pp = par.tensor_parallel_size, par.pipeline_parallel_size
    layers = [rank_layers(engine, p, local_layers) for p in range(pp)]
    return [(head_range(total_heads, tp, t), layers[p]) for p in range(pp) for t in range(tp)]


def _overlap(a: tuple, b: tuple) -> bool:
    """Whether two parts (a (start, stop) range per dimension: heads, then layers) share anything."""
    return all(max(x[0], y[0]) < min(x[1], y[1]) for x, y in zip(a, b))


def sources(mine: tuple, remote: list[tuple], rank: int) -> list[int]:
    """The remote ranks a local rank holding part `mine` reads (a part: (heads, layers), or (heads,)): one
    per distinct remote part that overlaps `mine` (of ranks holding the same part, the one at this rank's
    index among them)."""
    groups: dict[tuple, list[int]] = {}
    for r, part in enumerate(remote):
        if _overlap(mine, part):
            groups.setdefault(tuple(part), []).append(r)
    return [ranks[rank % len(ranks)] for ranks in groups.values()]


def readers(local: list[tuple], remote: list[tuple]) -> list[int]:
    """How many local ranks (their parts, by local rank) read each remote rank (0 for a rank whose part
    another replica serves)."""
    count = collections.Counter(r for d, mine in enumerate(local) for r in sources(mine, remote, d))
    return [count[r] for r in range(len(remote))]


class TPReports:
    """A DP rank's TP workers (PUSH) and their driver (PULL) on one ipc socket, sealed with the deployment's
    secret: at start the workers send the driver what it must publish for them; then each worker sends the
    request ids its reads finished (done or failed) and the ids whose held blocks it may free."""

    def __init__(self, where: str, tp_size: int, tp_rank: int, auth):
        self.tp_size, self.tp_rank, self.auth = tp_size, tp_rank, auth
        self.sock = zmq.Context.instance().socket(zmq.PULL if tp_rank == 0 else zmq.PUSH)
        (listen(self.sock, where) if tp_rank == 0 else self.sock.connect(where))
        self.loads: dict[str, list] = {}         # driver: request id -> [ranks that reported, any failed]
        self.sends: collections.Counter = collections.Counter()

    @classmethod
    def of(cls, engine, dp_rank: int, rank: int, auth) -> "TPReports":
        """The socket of this engine's DP rank `dp_rank`, for its local rank `rank` (pp_rank * TP + tp_rank:
        with pipeline stages every stage's ranks report to the driver)."""
        par = engine.parallel
        return cls(par.driver_endpoint(dp_rank, "kv-reads"), par.ranks_per_dp, rank, auth)

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
