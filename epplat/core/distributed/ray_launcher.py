"""Engine processes as Ray actors on an existing Ray cluster (``--distributed-executor-backend ray``,
``--data-parallel-backend ray``).

The cluster is the user's (``ray start --head`` / KubeRay): ``ray.init(address="auto")``, or
``RAY_ADDRESS``. Each engine process takes one bundle of one *device*: the platform's
``ray_resource`` ("GPU" on cuda, "NPU" on ascend; on cpu one "CPU", so a TP=2 x PP=2 engine takes
4 CPUs). Placement groups (STRICT_PACK) keep what must share a node on one node:

- ``--distributed-executor-backend ray``: one group per pipeline stage of each DP rank, so TP stays
  inside a node and the stages go wherever Ray finds their devices (across nodes);
- ``--data-parallel-backend ray`` alone: one group per DP rank (its engine core and its workers on
  one node, as vLLM's DP engine core with local workers), the DP ranks spread over the cluster.

With ``--enable-elastic-ep`` a scale-up places each new DP rank the same way (its own group, on any
node with room: ``check_room`` says first whether there is one) and a scale-down gives the departing
ranks' groups back once their actors ended (``RayEngine.join``); the internal sockets are tcp on the
nodes' addresses from the start, as a new rank may land on a node of its own.

A cluster that lacks the devices is one line naming what is missing. Only the start-up report (one
JSON line) and Ray's own actor lifecycle go through Ray; every step, request and output goes over
epplat's sockets and torch.distributed, as with mp: ipc within a node, tcp on the nodes' addresses
between nodes (_address_nodes; config.py's endpoints). An actor that dies (killed, its node lost) is
seen by ``RayEngine.is_alive`` as a dead process is with mp: ``/health`` turns 503 and requests end
with an error.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from epplat.config import ConfigError, EngineConfig

logger = logging.getLogger(__name__)

_PG_TIMEOUT_S = 30.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("the Ray backends need ray: pip install 'epplat[ray]'") from None
    return ray


class _Ready:
    """The engine's start-up report (a one-line JSON), as the mp pipe's ``send_bytes`` gives it."""

    def __init__(self):
        self.event, self.raw = threading.Event(), b""

    def send_bytes(self, raw: bytes) -> None:
        self.raw = raw
        self.event.set()


class EngineActor:
    """One engine process (core_proc.run_engine_process) in a Ray actor: ``start`` returns its start-up
    report once its model and KV cache are ready; ``wait`` returns when it ends."""

    def start(self, cfg_json: bytes, rank: int, name: str, env: dict, join: dict | None = None) -> bytes:
        import multiprocessing
        from epplat.core.engine.core_proc import run_engine_process
        os.environ.update(env)
        multiprocessing.current_process().name = name
        ready = _Ready()
        self.thread = threading.Thread(target=run_engine_process, args=(cfg_json, rank, 0, ready, None, join),
                                       name=name, daemon=True)
        self.thread.start()
        ready.event.wait()
        return ready.raw

    def wait(self) -> None:
        self.thread.join()

    def pid(self) -> int:
        return os.getpid()


class RayEngine:
    """A Ray actor seen as launcher.stop_engines and the engine client see a multiprocessing.Process."""

    def __init__(self, ray, actor, name: str, groups: list):
        self.ray, self.actor, self.name, self.groups = ray, actor, name, groups
        self.done = None
        self.exitcode = None

    def is_alive(self) -> bool:
        if self.exitcode is not None:
            return False
        if self.done is None:
            return True
        ready, _ = self.ray.wait([self.done], timeout=0)
        if not ready:
            return True
        try:
            self.ray.get(self.done)
            self.exitcode = 0
        except Exception:
            self.exitcode = -9          # the actor died (killed, or its node lost)
        return False

    def kill(self) -> None:
        try:
            self.ray.kill(self.actor)
        except Exception:
            pass
        self.exitcode = -9 if self.exitcode is None else self.exitcode
        self._release()

    terminate = kill

    def join(self, timeout: float | None = None) -> None:
        """Wait for the actor to end; an ended one gives its placement group back (a rank that left)."""
        if self.done is not None and self.ray.wait([self.done], timeout=timeout)[0]:
            self._release()

    def _release(self) -> None:
        for pg in self.groups:
            try:
                self.ray.util.remove_placement_group(pg)
            except Exception:
                pass
        self.groups = []


def _placement(cfg: EngineConfig, dp_ranks=None) -> list[list[int]]:
    """The world ranks of each placement group (each group on one node) of ``dp_ranks`` (default: all)."""
    par = cfg.parallel
    per_dp, tp = par.ranks_per_dp, par.tensor_parallel_size
    dp_ranks = par.local_dp_ranks() if dp_ranks is None else dp_ranks
    if par.distributed_executor_backend == "ray":
        return [[d * per_dp + s * tp + t for t in range(tp)] for d in dp_ranks
                for s in range(par.pipeline_parallel_size)]
    return [[d * per_dp + j for j in range(per_dp)] for d in dp_ranks]


def _check_resources(ray, resource: str, groups: list[list[int]], free: list | None = None) -> None:
    """One line when the cluster cannot hold the groups (each on one node), before anything waits; ``free``:
    what each node has left (a scale-up), else the nodes' totals (the start)."""
    have = sorted(free if free is not None else (n["Resources"].get(resource, 0) for n in ray.nodes()
                                                 if n.get("Alive")), reverse=True)
    left = list(have)
    need = sorted((len(g) for g in groups), reverse=True)
    for size in need:                     # first fit, largest groups first
        for i, f in enumerate(left):
            if f >= size:
                left[i] -= size
                break
        else:
            raise ConfigError(f"the Ray cluster lacks the devices: {len(groups)} group(s) of {need[0]} x {resource!r} "
                              f"each on one node ({sum(need)} in all) are needed, its nodes have {have}"
                              f"{' free' if free is not None else ''} (ray status shows them)")


def check_room(cfg: EngineConfig, platform_cls, dp_ranks) -> None:
    """ConfigError (one line naming the devices) when the cluster has no room now for new DP ranks
    ``dp_ranks`` (an elastic scale-up), each group on one node: the nodes' devices less what the
    placement groups of the cluster hold."""
    ray = _connect()
    resource = platform_cls.ray_resource
    free = {n["NodeID"]: n["Resources"].get(resource, 0) for n in ray.nodes() if n.get("Alive")}
    for pg in ray.util.placement_group_table().values():
        if pg["state"] in ("CREATED", "PENDING", "RESCHEDULING"):
            for i, node in pg["bundles_to_node_id"].items():
                if node in free:
                    free[node] -= pg["bundles"][i].get(resource, 0)
    _check_resources(ray, resource, _placement(cfg, dp_ranks), list(free.values()))


def _connect():
    ray = import_ray()
    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")      # every engine process's lines, as with mp
        try:
            ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=True,
                     logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as e:
            raise ConfigError(f"no Ray cluster to join (ray.init(address='auto')): start one with `ray start --head` "
                              f"or set RAY_ADDRESS ({str(e).splitlines()[0]})") from None
    return ray


def start_ray_engines(cfg: EngineConfig, platform_cls, timeout: float = 900.0, dp_ranks=None,
                      join: dict | None = None) -> list[RayEngine]:
    """Place and start the engine processes of ``dp_ranks`` (default: the layout's) as Ray actors;
    ``join``: they join running ranks (an elastic scale-up, core_proc). ConfigError on failure."""
    ray = _connect()
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    resource = platform_cls.ray_resource
    groups = _placement(cfg, dp_ranks)
    if join is None:
        _check_resources(ray, resource, groups)
    t0 = time.time()
    pgs = [placement_group([{resource: 1}] * len(g), strategy="STRICT_PACK") for g in groups]
    ready, _ = ray.wait([pg.ready() for pg in pgs], num_returns=len(pgs), timeout=_PG_TIMEOUT_S)
    if len(ready) < len(pgs):
        for pg in pgs:
            ray.util.remove_placement_group(pg)
        raise ConfigError(f"the Ray cluster did not grant {len(pgs)} placement group(s) of {len(groups[0])} x "
                          f"{resource!r} within {_PG_TIMEOUT_S:g} s (devices taken by other jobs? see ray status)")
    par = cfg.parallel
    nodes = [n for pg in pgs for _, n in sorted(ray.util.placement_group_table(pg)["bundles_to_node_id"].items())]
    _address_nodes(ray, par, groups, nodes)
    env = {k: v for k, v in os.environ.items() if k.startswith(("EPPLAT_", "VLLM_"))
           and not (par.node_addresses and k in _HOST_IP_VARS)}
    actor_cls = ray.remote(EngineActor)
    opts = {"CPU": "num_cpus", "GPU": "num_gpus"}
    engines, starts = [], []
    raw = cfg.to_json()
    for gi, (g, pg) in enumerate(zip(groups, pgs)):
        for bundle, rank in enumerate(g):
            d, j = divmod(rank, par.ranks_per_dp)
            s, t = divmod(j, par.tensor_parallel_size)
            name = (f"EngineCore_DP{d}" + (f"_PP{s}" if par.pipeline_parallel_size > 1 else "")
                    + (f"_TP{t}" if par.tensor_parallel_size > 1 else ""))
            res = {opts[resource]: 1} if resource in opts else {"num_cpus": 0, "resources": {resource: 1}}
            unique = f"{name}-{os.getpid()}" + (f"-g{join['generation']}" if join else "")   # a rank number returns
            actor = actor_cls.options(name=unique, **res, scheduling_strategy=
                                      PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)).remote()
            engines.append(RayEngine(ray, actor, name, [pg] if bundle == 0 else []))
            starts.append(actor.start.remote(raw, rank, name, env, join))
    try:
        pending = list(starts)
        deadline = time.time() + timeout
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.time()))
            if not done:
                raise ConfigError("engine processes did not start in time")
            import msgspec
            info = msgspec.json.decode(ray.get(done[0]))
            if "error" in info:
                raise ConfigError(info["error"])
    except ray.exceptions.RayActorError as e:
        _stop(engines)
        raise ConfigError(f"an engine actor died during startup: {str(e).splitlines()[0]}") from None
    except BaseException:
        _stop(engines)
        raise
    pids = ray.get([e.actor.pid.remote() for e in engines])
    for e in engines:
        e.done = e.actor.wait.remote()
    ids = {n: i for i, n in enumerate(dict.fromkeys(nodes))}
    logger.info("Ray placed %d engine process(es) in %d placement group(s) of %d x %s on %d node(s) in %.1f s: %s",
                len(engines), len(pgs), len(groups[0]), resource, len(ids), time.time() - t0,
                ", ".join(f"{e.name} pid {pid} on node {ids[n]} ({n[:8]})" for e, pid, n in zip(engines, pids, nodes)))
    return engines


_HOST_IP_VARS = ("EPPLAT_HOST_IP", "VLLM_HOST_IP")


def _address_nodes(ray, par, groups: list[list[int]], nodes: list[str]) -> None:
    """When Ray placed a rank on a node other than the launcher's, or may later (elastic EP): every rank's
    node address (Ray's NodeManagerAddress, the one `ray start --node-ip-address` names; the running ranks'
    from the config on a scale-up) and the launcher's (EPPLAT_HOST_IP / VLLM_HOST_IP, else Ray's for this
    node) go into the config, so that the sockets between nodes are tcp on those addresses (config.py);
    on one node they stay ipc."""
    address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    of_rank = dict(enumerate(par.node_addresses))
    placed = dict(zip((r for g in groups for r in g), (address[n] for n in nodes)))
    of_rank.update(placed)
    here = next((os.environ[v] for v in _HOST_IP_VARS if os.environ.get(v)), None) or ray.util.get_node_ip_address()
    if set(placed.values()) != {here} or par.enable_elastic_ep:
        par.node_addresses = [of_rank[r] for r in range(par.world_size)]
        par.data_parallel_address = here
        logger.info("Ray placed engine processes on other nodes: internal sockets between nodes on tcp (this node "
                    "%s, world ranks' nodes %s)", here, ", ".join(par.node_addresses))


def _stop(engines) -> None:
    for e in engines:
        e.kill()
