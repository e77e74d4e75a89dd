"""NixlConnector (vLLM's name and flow) on the real `nixl` package: the decode side READs the KV
blocks a prefill instance computed, straight from the prefill process's KV cache (host memory on
the cpu platform, GPU memory on cuda), through NIXL's UCX backend. The request flow (what is held,
what is pulled, the kv_transfer_params) is connectors/pull.py's.

The decode worker asks the prefill DP rank's side channel (VLLM_NIXL_SIDE_CHANNEL_HOST,
VLLM_NIXL_SIDE_CHANNEL_PORT + DP rank; authenticated with the deployment's secret) for its agent
metadata once per engine (a handshake that refuses a different model, dtype or KV layout), then for
a lease on the request's blocks, and READs the blocks it lacks in one transfer per request, the
descriptors of adjacent blocks merged. A read's completion notifies the prefill agent, which frees
the blocks. Other requests keep stepping meanwhile. When the prefill side is gone, refuses, or has
freed the blocks, the request is recomputed here from the prompt tokens it carries, with a warning.

A decode side with tensor parallelism: every TP rank reads its own KV heads of the blocks (whole
blocks when the heads match the prefill rank's, else its heads of every token), and the TP workers
report their reads to their driver over an authenticated ipc socket; the driver reports a request
received (or failed) once every rank has. The prefill side frees the blocks after one read per
decode TP rank.

Limits: one rank per DP rank on the prefill side (tensor parallel size 1); the KV layouts must match.
"""

from __future__ import annotations

import logging
import tempfile

import msgspec
import zmq

from epplat.config import ConfigError
from epplat.connectors import side_channel
from epplat.connectors.pull import (HeldBlocks, Pull, PullConnector, compat, compat_error, env, head_range,
                                    total_kv_heads)
from epplat.core.engine.frame_auth import BadFrame, FrameAuth

logger = logging.getLogger(__name__)


def load_nixl():
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError:
        raise ConfigError("NixlConnector needs the nixl package: pip install 'epplat[nixl]'") from None
    return nixl_agent, nixl_agent_config


def merge(descs: list[tuple[int, int, int]], remote: list[tuple[int, int, int]]):
    """Pairs of (local, remote) descriptors with runs contiguous on both sides merged into one."""
    out_l: list[list[int]] = []
    out_r: list[list[int]] = []
    for (la, ln, ld), (ra, rn, rd) in zip(descs, remote):
        if out_l and out_l[-1][0] + out_l[-1][1] == la and out_r[-1][0] + out_r[-1][1] == ra:
            out_l[-1][1] += ln
            out_r[-1][1] += rn
        else:
            out_l.append([la, ln, ld])
            out_r.append([ra, rn, rd])
    return [tuple(d) for d in out_l], [tuple(d) for d in out_r]


class NixlConnector(PullConnector):
    @classmethod
    def check_config(cls, engine) -> None:
        if engine.parallel.tensor_parallel_size != 1 and engine.kv_transfer.is_producer:
            raise ConfigError("NixlConnector: a prefill side (kv_producer / kv_both) with --tensor-parallel-size "
                              "above 1 is not supported yet (the decode side may use any)")

    def __init__(self, config, engine, role, dp_rank: int = 0, tp_rank: int = 0):
        super().__init__(config, engine, role, dp_rank, tp_rank)
        self.host = env("NIXL_SIDE_CHANNEL_HOST", "127.0.0.1")
        self.port = int(env("NIXL_SIDE_CHANNEL_PORT", "5600")) + dp_rank
        self.auth = FrameAuth(engine.parallel.internal_secret)
        self.agent = None
        self.held = HeldBlocks(self.timeout)
        self.remote: dict[tuple[str, int], tuple[str, list, int, int]] = {}   # -> agent, bases, block bytes, heads
        self.inflight: dict[str, tuple[object, str]] = {}
        self.failed: set[str] = set()
        self.failed_out: set[str] = set()
        self.tp_state: dict[str, list] = {}        # driver: request id -> [TP ranks that reported, any failed]
        self.tp_sock = self.server = None

    def endpoint(self) -> tuple[str, int]:
        return self.host, self.port

    def transfer_params(self, req) -> dict:
        return {"tp_size": self.tp_size}

    # -- worker side ---------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: list[tuple]) -> None:
        nixl_agent, nixl_agent_config = load_nixl()
        self.kv_caches = kv_caches
        k = kv_caches[0][0]
        self.mem = "VRAM" if k.device.type == "cuda" else "DRAM"
        self.dev = k.device.index or 0
        self.block_bytes = k[0].numel() * k.element_size()
        self.head_bytes = k.shape[3] * k.element_size()
        self.heads = head_range(total_kv_heads(self.engine, k.shape[2]), self.tp_size, self.tp_rank)
        backends = self.config.kv_connector_extra_config.get("backends", ["UCX"])
        self.agent_name = f"{self.engine_id}-dp{self.dp_rank}-tp{self.tp_rank}"
        # no UCX progress thread: an idle one spins (0.4 of a core per agent, measured); the engine loop
        # progresses the agent instead (get_finished, every few ms while transfers or held blocks exist)
        self.agent = nixl_agent(self.agent_name, nixl_agent_config(enable_prog_thread=False, backends=list(backends)))
        tensors = [t for kv in kv_caches for t in kv]
        self.reg = self.agent.register_memory([(t.data_ptr(), t.numel() * t.element_size(), self.dev, "")
                                               for t in tensors], self.mem)
        self.bases = [t.data_ptr() for t in tensors]
        self.my_compat = compat(self.engine, kv_caches)
        if self.tp_size > 1:
            par = self.engine.parallel
            where = f"ipc://{par.ipc_dir or tempfile.gettempdir()}/kv-reads-dp{self.dp_rank}-{par.data_parallel_rpc_port}"
            self.tp_sock = zmq.Context.instance().socket(zmq.PULL if self.tp_rank == 0 else zmq.PUSH)
            (self.tp_sock.bind if self.tp_rank == 0 else self.tp_sock.connect)(where)
        if self.config.is_producer:
            self.server = side_channel.SideChannelServer(self.host, self.port, self._answer, self.auth)
            logger.info("NixlConnector: DP rank %d serves its KV blocks at %s:%d (agent %s)", self.dp_rank, self.host,
                        self.port, self.agent_name)

    def _answer(self, msg: dict) -> dict:
        """The prefill side's side channel: handshakes and leases."""
        if msg.get("op") == "handshake":
            why = compat_error(self.my_compat, msg.get("compat") or {})
            if why:
                return {"error": why}
            return {"agent": self.agent.get_agent_metadata(), "bases": self.bases, "block_bytes": self.block_bytes,
                    "heads": list(self.heads), "engine_id": self.engine_id, "compat": self.my_compat}
        if msg.get("op") == "lease":
            why = self.held.lease(msg.get("request_id"), msg.get("readers", 1))
            return {"error": why} if why else {"ok": True}
        return {"error": "unknown op"}

    def _handshake(self, host: str, port: int) -> tuple[str, list, int, tuple]:
        key = (host, port)
        if key not in self.remote:
            r = side_channel.request(host, port, {"op": "handshake", "compat": self.my_compat}, self.auth)
            if "error" in r:
                raise RuntimeError(f"NixlConnector handshake with {host}:{port} refused: {r['error']}")
            name = self.agent.add_remote_agent(r["agent"])
            self.remote[key] = (name, r["bases"], r["block_bytes"], tuple(r["heads"]))
        return self.remote[key]

    def descriptors(self, pull: Pull, bases: list, block_bytes: int, heads: tuple) -> tuple[list, list]:
        """The (local, remote) descriptors of a pull: whole blocks when both sides hold the same heads, else
        this rank's heads of every token; runs adjacent on both sides merged."""
        a, b = max(self.heads[0], heads[0]), min(self.heads[1], heads[1])
        if a >= b:
            raise RuntimeError(f"the remote rank holds KV heads {heads}, none of this rank's {self.heads}")
        local, remote = [], []
        if heads == self.heads:
            for lbase, rbase in zip(self.bases, bases):
                for lb, rb in zip(pull.local_blocks, pull.remote_blocks):
                    local.append((lbase + lb * self.block_bytes, self.block_bytes, self.dev))
                    remote.append((rbase + rb * block_bytes, block_bytes, 0))
            return merge(local, remote)
        hb = self.head_bytes
        lrow, rrow = (self.heads[1] - self.heads[0]) * hb, (heads[1] - heads[0]) * hb
        n = (b - a) * hb
        for lbase, rbase in zip(self.bases, bases):
            for lb, rb in zip(pull.local_blocks, pull.remote_blocks):
                for t in range(self.block_size):
                    local.append((lbase + lb * self.block_bytes + t * lrow + (a - self.heads[0]) * hb, n, self.dev))
                    remote.append((rbase + rb * block_bytes + t * rrow + (a - heads[0]) * hb, n, 0))
        return merge(local, remote)

    def start_load_kv(self, meta) -> None:
        self.held.hold(meta.holds)
        for pull in meta.pulls:
            try:
                name, bases, block_bytes, heads = self._handshake(pull.remote_host, pull.remote_port)
                r = side_channel.request(pull.remote_host, pull.remote_port,
                                         {"op": "lease", "request_id": pull.remote_request_id,
                                          "readers": self.tp_size}, self.auth)
                if "error" in r:
                    raise RuntimeError(r["error"])
                local, remote = self.descriptors(pull, bases, block_bytes, heads)
                handle = self.agent.initialize_xfer("READ", self.agent.get_xfer_descs(local, self.mem),
                                                    self.agent.get_xfer_descs(remote, self.mem), name,
                                                    pull.remote_request_id.encode())
                if self.agent.transfer(handle) == "ERR":
                    raise RuntimeError("transfer did not start")
                self.inflight[pull.request_id] = (handle, f"{pull.remote_host}:{pull.remote_port}")
            except (OSError, RuntimeError, ValueError, KeyError) as e:
                logger.warning("NixlConnector: request %s: KV from %s:%d unavailable (%s); computing its prompt "
                               "here instead", pull.request_id, pull.remote_host, pull.remote_port, e)
                self.failed.add(pull.request_id)

    def _poll_reads(self) -> tuple[set[str], set[str]]:
        """This rank's reads that ended since the last poll: (done, failed)."""
        done = set()
        for rid, (handle, where) in list(self.inflight.items()):
            state = self.agent.check_xfer_state(handle)
            if state == "PROC":
                continue
            del self.inflight[rid]
            self.agent.release_xfer_handle(handle)
            if state == "DONE":
                done.add(rid)
            else:
                logger.warning("NixlConnector: request %s: the read from %s failed; computing its prompt here", rid,
                               where)
                self.failed.add(rid)
        failed, self.failed = self.failed, set()
        return done, failed

    def _gather(self, done: set[str], failed: set[str]) -> tuple[set[str], set[str]]:
        """The driver: requests every TP rank has finished reading (done, or failed on some rank)."""
        reports = [(done, failed)]
        while True:
            try:
                raw = self.tp_sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = self.auth.decode(msgspec.msgpack.Decoder(dict[str, list[str]]), raw)
                reports.append((set(msg["done"]), set(msg["failed"])))
            except (BadFrame, KeyError) as e:
                self.auth.dropped("the KV reads socket", e)
        for d, f in reports:
            for rid in d | f:
                state = self.tp_state.setdefault(rid, [0, False])
                state[0] += 1
                state[1] = state[1] or rid in f
        done, failed = set(), set()
        for rid, (ranks, bad) in list(self.tp_state.items()):
            if ranks == self.tp_size:
                del self.tp_state[rid]
                (failed if bad else done).add(rid)
        return done, failed

    def busy(self) -> bool:
        return bool(self.inflight or self.failed)

    def get_finished(self) -> tuple[set[str], set[str]]:
        if self.agent is None:
            return set(), set()
        for msgs in self.agent.get_new_notifs().values():
            for m in msgs:
                self.held.read(m.decode())
        done, failed = self._poll_reads()
        if self.tp_sock is not None and self.tp_rank > 0:
            if done or failed:
                self.tp_sock.send(self.auth.seal(msgspec.msgpack.encode({"done": sorted(done),
                                                                         "failed": sorted(failed)})))
            return set(), set()
        if self.tp_sock is not None:
            done, failed = self._gather(done, failed)
        self.failed_out |= failed
        return self.held.freeable(), done

    def get_failed_loads(self) -> set[str]:
        failed, self.failed_out = self.failed_out, set()
        return failed

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.tp_sock is not None:
            self.tp_sock.close(linger=0)
