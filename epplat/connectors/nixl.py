"""NixlConnector (vLLM's name and flow) on the real `nixl` package: the decode side READs the KV
blocks a prefill instance computed, straight from the prefill process's KV cache (host memory on
the cpu platform, GPU memory on cuda), through NIXL's UCX backend. The request flow (what is held,
what is pulled, the kv_transfer_params) is connectors/pull.py's.

Each DP rank of a prefill side has one side channel (VLLM_NIXL_SIDE_CHANNEL_HOST,
VLLM_NIXL_SIDE_CHANNEL_PORT + DP rank, vLLM's ports; authenticated with the deployment's secret)
that answers the handshake for all its TP ranks: each rank's agent metadata, KV cache addresses,
KV heads and the port where it leases its blocks (TP rank 0 at the side channel itself, the others
at ports of their own). The handshake refuses a different model, dtype or KV layout.

Any TP sizes on the two sides (vLLM's heterogeneous TP): every decode TP rank reads its own KV
heads from the prefill TP ranks that hold them (from one rank when the head splits agree, from
several when the prefill side splits finer, a slice of one rank's heads when coarser), in one
transfer per prefill rank and request, the descriptors of adjacent blocks merged (whole blocks when
both ranks hold the same heads, else the heads of every token). A read's completion notifies the
prefill rank's agent; each prefill rank frees its blocks after the reads of every decode rank that
reads it, and its driver reports the request freed once all its TP ranks have. The decode TP ranks
report their reads to their driver, which reports a request received (or failed) once every rank
has (connectors/tp_ranks.py). Other requests keep stepping meanwhile. When the prefill side is gone,
refuses, or has freed the blocks, the request is recomputed here from the prompt tokens it
carries, with a warning.

Pipeline stages on either side, any two counts: a rank holds its stage's layers, announced with its
heads; each decode rank reads the layers it holds from the ranks of the stages holding them (each
stage's ranks read and serve their own layers), every stage's ranks report to the driver.

Limits: the KV layouts must match (but the TP and PP splits).
"""

from __future__ import annotations

import logging
import os

from epplat.config import ConfigError
from epplat.connectors import side_channel
from epplat.connectors.pull import HeldBlocks, Pull, PullConnector, compat, compat_error, env, total_kv_heads
from epplat.connectors.tp_ranks import TPReports, head_range, rank_layers, rank_parts, readers, sources

logger = logging.getLogger(__name__)


def load_nixl():
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError:
        raise ConfigError("NixlConnector needs the nixl package: pip install 'epplat[nixl]'") from None
    return nixl_agent, nixl_agent_config


def allow_cuda_ipc_reads() -> None:
    """The decode side READs GPU memory of another process. UCX's cuda_ipc transport offers that READ
    (zero-copy GET) only where it finds NVLink unless UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y; without it UCX
    emulates the READ through host memory over tcp: on one H200, 0.52 against 31.6 GB/s, and the
    one-GPU PD pair at half the colocated throughput (docs/benchmarks.md). So GPU memory gets it on,
    unless the deployment set it."""
    if "UCX_CUDA_IPC_ENABLE_GET_ZCOPY" not in os.environ:
        os.environ["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] = "y"
        logger.info("NixlConnector: UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y (cuda_ipc READs without NVLink; "
                    "set it in the environment to choose otherwise)")


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
    pipeline_stages = True

    def __init__(self, config, engine, role, dp_rank: int = 0, tp_rank: int = 0, pp_rank: int = 0):
        super().__init__(config, engine, role, dp_rank, tp_rank, pp_rank)
        self.host = env("NIXL_SIDE_CHANNEL_HOST", "127.0.0.1")
        self.port = int(env("NIXL_SIDE_CHANNEL_PORT", "5600")) + dp_rank
        self.auth = side_channel.channel_auth(engine.parallel, "NixlConnector")
        self.agent = None
        self.held = HeldBlocks(self.timeout)
        self.remote: dict[tuple[str, int], list[dict]] = {}     # side channel -> its TP ranks (agent name added)
        self.inflight: dict[str, tuple[list, str]] = {}          # request id -> transfer handles, where from
        self.failed: set[str] = set()
        self.spoiled: set[str] = set()              # reads started, then given up

    def endpoint(self) -> tuple[str, int]:
        return self.host, self.port

    def transfer_params(self, req) -> dict:
        return {"tp_size": self.tp_size}

    # -- worker side ---------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: list[tuple]) -> None:
        self.kv_caches = kv_caches
        k = kv_caches[0][0]
        self.mem = "VRAM" if k.device.type == "cuda" else "DRAM"
        if self.mem == "VRAM":           # before nixl (and UCX) is loaded in this process
            allow_cuda_ipc_reads()
        nixl_agent, nixl_agent_config = load_nixl()
        self.dev = k.device.index or 0
        self.block_bytes = k[0].numel() * k.element_size()
        self.head_bytes = k.shape[3] * k.element_size()
        self.total_heads = total_kv_heads(self.engine, k.shape[2])
        self.heads = head_range(self.total_heads, self.tp_size, self.tp_rank)
        self.layers = rank_layers(self.engine, self.pp_rank, len(kv_caches))
        self.per_layer = len(kv_caches[0])
        backends = self.config.kv_connector_extra_config.get("backends", ["UCX"])
        stage = f"-pp{self.pp_rank}" if self.pp_rank else ""
        self.agent_name = f"{self.engine_id}-dp{self.dp_rank}-tp{self.tp_rank}{stage}"
        # no UCX progress thread: an idle one spins (0.4 of a core per agent, measured); the engine loop
        # progresses the agent instead (get_finished, every few ms while transfers or held blocks exist)
        self.agent = nixl_agent(self.agent_name, nixl_agent_config(enable_prog_thread=False, backends=list(backends)))
        tensors = [t for kv in kv_caches for t in kv]
        self.reg = self.agent.register_memory([(t.data_ptr(), t.numel() * t.element_size(), self.dev, "")
                                               for t in tensors], self.mem)
        self.bases = [t.data_ptr() for t in tensors]
        self.my_compat = compat(self.engine, kv_caches)
        if self.config.is_producer:      # the driver at the DP rank's side channel port, the others where they can
            self.server = side_channel.SideChannelServer(self.host, self.port if self.local_rank == 0 else 0,
                                                         self._answer, self.auth)
        info = {"agent": self.agent.get_agent_metadata(), "bases": self.bases, "block_bytes": self.block_bytes,
                "heads": list(self.heads), "layers": list(self.layers), "port": self.server.port if self.server else 0}
        self.ranks = [info]
        if self.engine.parallel.ranks_per_dp > 1:
            self.tp = TPReports.of(self.engine, self.dp_rank, self.local_rank, self.auth)
            self.ranks = self.tp.exchange(info if self.config.is_producer else {})
        if self.config.is_producer and self.local_rank == 0:
            logger.info("NixlConnector: DP rank %d serves the KV blocks of its %d rank(s) at %s:%d (agent %s)",
                        self.dp_rank, self.engine.parallel.ranks_per_dp, self.host, self.port, self.agent_name)

    def _answer(self, msg: dict) -> dict:
        """The prefill side's side channel: handshakes (TP rank 0 only) and leases."""
        if msg.get("op") == "handshake" and self.local_rank == 0:
            why = compat_error(self.my_compat, msg.get("compat") or {})
            if why:
                return {"error": why}
            return {"ranks": self.ranks, "engine_id": self.engine_id, "compat": self.my_compat}
        if msg.get("op") == "lease":
            why = self.held.lease(msg.get("request_id"), msg.get("readers", 1))
            return {"error": why} if why else {"ok": True}
        return {"error": "unknown op"}

    def _handshake(self, host: str, port: int) -> list[dict]:
        """The remote DP rank's TP ranks: agent name, bases, block bytes, heads and lease port of each."""
        key = (host, port)
        if key not in self.remote:
            r = side_channel.request(host, port, {"op": "handshake", "compat": self.my_compat}, self.auth)
            if "error" in r:
                raise RuntimeError(f"NixlConnector handshake with {host}:{port} refused: {r['error']}")
            ranks = [{**info, "heads": tuple(info["heads"]), "layers": tuple(info["layers"]),
                      "name": self.agent.add_remote_agent(info["agent"])} for info in r["ranks"]]
            self.remote[key] = ranks
        return self.remote[key]

    def layer_bases(self, bases: list, layers: tuple) -> list[tuple[int, int]]:
        """(local, remote) cache addresses of the layers both ranks hold (pipeline stages hold some)."""
        (l0, l1), (r0, _) = self.layers, layers
        return [(self.bases[(layer - l0) * self.per_layer + j], bases[(layer - r0) * self.per_layer + j])
                for layer in range(max(l0, r0), min(l1, layers[1])) for j in range(self.per_layer)]

    def descriptors(self, pull: Pull, bases: list, block_bytes: int, heads: tuple, layers: tuple) -> tuple[list, list]:
        """The (local, remote) descriptors of a pull from one remote rank, of the layers both hold: whole
        blocks when both ranks hold the same heads, else the heads both hold of every token; runs adjacent
        on both sides merged."""
        a, b = max(self.heads[0], heads[0]), min(self.heads[1], heads[1])
        if a >= b:
            raise RuntimeError(f"the remote rank holds KV heads {heads}, none of this rank's {self.heads}")
        local, remote = [], []
        if heads == self.heads:
            for lbase, rbase in self.layer_bases(bases, layers):
                for lb, rb in zip(pull.local_blocks, pull.remote_blocks):
                    local.append((lbase + lb * self.block_bytes, self.block_bytes, self.dev))
                    remote.append((rbase + rb * block_bytes, block_bytes, 0))
            return merge(local, remote)
        hb = self.head_bytes
        lrow, rrow = (self.heads[1] - self.heads[0]) * hb, (heads[1] - heads[0]) * hb
        n = (b - a) * hb
        for lbase, rbase in self.layer_bases(bases, layers):
            for lb, rb in zip(pull.local_blocks, pull.remote_blocks):
                for t in range(self.block_size):
                    local.append((lbase + lb * self.block_bytes + t * lrow + (a - self.heads[0]) * hb, n, self.dev))
                    remote.append((rbase + rb * block_bytes + t * rrow + (a - heads[0]) * hb, n, 0))
        return merge(local, remote)

    def _lease(self, host: str, port: int, request_id: str, n: int) -> None:
        r = side_channel.request(host, port, {"op": "lease", "request_id": request_id, "readers": n}, self.auth)
        if "error" in r:
            raise RuntimeError(r["error"])

    def start_load_kv(self, meta) -> None:
        self.held.update(meta)
        for pull in meta.pulls:
            handles = []
            try:
                ranks = self._handshake(pull.remote_host, pull.remote_port)
                parts = [(r["heads"], r["layers"]) for r in ranks]
                count = readers(rank_parts(self.engine, self.total_heads, len(self.kv_caches)), parts)
                mine = sources((self.heads, self.layers), parts, self.local_rank)
                # every remote rank is leased by the local ranks that read it; one no rank reads (its heads
                # served by a replica) is released by the driver at once
                for r in mine + ([r for r, n in enumerate(count) if n == 0] if self.local_rank == 0 else []):
                    self._lease(pull.remote_host, ranks[r]["port"], pull.remote_request_id, count[r])
                for r in mine:
                    local, remote = self.descriptors(pull, ranks[r]["bases"], ranks[r]["block_bytes"], *parts[r])
                    handle = self.agent.initialize_xfer("READ", self.agent.get_xfer_descs(local, self.mem),
                                                        self.agent.get_xfer_descs(remote, self.mem), ranks[r]["name"],
                                                        pull.remote_request_id.encode())
                    handles.append(handle)
                    if self.agent.transfer(handle) == "ERR":
                        raise RuntimeError("transfer did not start")
                self.inflight[pull.request_id] = (handles, f"{pull.remote_host}:{pull.remote_port}")
            except (OSError, RuntimeError, ValueError, KeyError) as e:
                logger.warning("NixlConnector: request %s: KV from %s:%d unavailable (%s); computing its prompt "
                               "here instead", pull.request_id, pull.remote_host, pull.remote_port, e)
                if handles:             # the transfers that started must end before their memory is reused
                    self.inflight[pull.request_id] = (handles, f"{pull.remote_host}:{pull.remote_port}")
                    self.spoiled.add(pull.request_id)
                else:
                    self.failed.add(pull.request_id)

    def _poll_reads(self) -> tuple[set[str], set[str]]:
        """This rank's reads that ended since the last poll: (done, failed)."""
        done = set()
        for rid, (handles, where) in list(self.inflight.items()):
            states = [self.agent.check_xfer_state(h) for h in handles]
            if "PROC" in states:
                continue
            del self.inflight[rid]
            for h in handles:
                self.agent.release_xfer_handle(h)
            if all(s == "DONE" for s in states) and rid not in self.spoiled:
                done.add(rid)
            else:
                if rid not in self.spoiled:
                    logger.warning("NixlConnector: request %s: the read from %s failed; computing its prompt here",
                                   rid, where)
                self.spoiled.discard(rid)
                self.failed.add(rid)
        failed, self.failed = self.failed, set()
        return done, failed

    def busy(self) -> bool:
        return bool(self.inflight or self.failed or self.held.pending())

    def get_finished(self) -> tuple[set[str], set[str]]:
        if self.agent is None:
            return set(), set()
        for msgs in self.agent.get_new_notifs().values():
            for m in msgs:
                self.held.read(m.decode())
        done, failed = self._poll_reads()
        sent = self.held.freeable()
        if self.tp is not None:
            done, failed, sent = self.tp.collect(done, failed, sent)
        self.failed_out |= failed
        return sent, done

