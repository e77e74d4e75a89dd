"""The Ray backends on one machine with simulated nodes (ray.cluster_utils.Cluster: a head with no
CPUs and two nodes of 2 CPUs each at addresses of their own, 127.0.0.2 and 127.0.0.3 on the loopback;
on the cpu platform a device is one CPU): PP=2 x TP=2 placed by Ray (each stage's TP ranks on one
node, the stages on both), DP cores placed by Ray; greedy tokens equal transformers' through HTTP and
the openai client; the sockets between processes on different nodes are tcp on the nodes' addresses
(seen in /proc: each process's connections), those within a node ipc; a killed actor turns /health to 503 and
ends in-flight requests with an error, as with mp. Elastic EP on the DP cores placed by Ray: a scale
2 -> 3 places the new DP rank as an actor in a placement group of its own on a node with room (Ray's
placement-group table says which), its sockets to the running ranks and the API server tcp on the nodes'
addresses; 3 -> 2 gives that group back; a size the cluster has no room for is a 400 naming the devices;
a new actor killed in the expert exchange is a 500 with the old size kept; a streaming load runs
throughout and every answer is transformers'. A cluster without the devices, and ray missing, are one
line. One cluster for the whole module (Ray's start-up is the costly part)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from epplat.config import ConfigError, EngineConfig, ModelConfig, ParallelConfig
from server_utils import HealthPoller, Server, free_ports, tcp_sockets
from test_elastic_ep import _Load, _requests_per_rank, _scale, _scale_with_traffic, _Stream, oracle_texts
from test_parallel import PROMPTS, complete, expected_texts


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for ip in ("127.0.0.2", "127.0.0.3"):
        c.add_node(num_cpus=2, node_ip_address=ip)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def _placed(log: str) -> tuple[dict, dict, str, list[str]]:
    """From the launcher's log: each engine process's pid and node index, this node's address, each world
    rank's node address (as last placed)."""
    pids = {name: int(pid) for name, pid in re.findall(r"(EngineCore_\w+) pid (\d+) on node", log)}
    node = dict(re.findall(r"(EngineCore_\w+) pid \d+ on node (\d)", log))
    found = re.findall(r"internal sockets between nodes on tcp \(this node (\S+), world ranks' nodes ([^)]*)\)", log)
    assert found, log[-3000:]
    here, nodes = found[-1]             # the last placement (an elastic scale-up's, after the start's)
    return pids, node, here, nodes.split(", ")


def _rpc_port(world: int) -> int:
    """A --data-parallel-rpc-port with the ports derived from it free (+100.. : Ray across nodes)."""
    return free_ports((0, 1, 2, 10, 11, *range(100, 102 + 2 * world)))


def test_pp2_tp2_placed_by_ray(cluster, qwen3_moe_dir):
    model = str(qwen3_moe_dir)
    rpc = _rpc_port(4)
    with Server(model, "--dtype", "float32", "-pp", "2", "-tp", "2", "--distributed-executor-backend", "ray",
                "--max-model-len", "256", "--data-parallel-rpc-port", str(rpc), env={"RAY_ADDRESS": cluster.address},
                timeout=300) as s:
        log = s.output()
        assert "Ray placed 4 engine process(es) in 2 placement group(s) of 2 x CPU on 2 node(s)" in log, log[-3000:]
        # each stage's TP ranks share a node, the two stages are on the two nodes
        pids, node, here, nodes = _placed(log)
        assert node["EngineCore_DP0_PP0_TP0"] == node["EngineCore_DP0_PP0_TP1"] != node["EngineCore_DP0_PP1_TP0"] \
            == node["EngineCore_DP0_PP1_TP1"], node
        assert sorted(set(nodes)) == ["127.0.0.2", "127.0.0.3"], nodes
        assert complete(s.url, model) == expected_texts(model, PROMPTS, 8)
        driver = nodes[0]
        # the driver reaches the API server on this node's address over tcp; the stage on the other node gets
        # its steps over tcp from the driver's node address (world rank r at rpc + 100 + 2r); the driver's
        # own stage's TP worker over ipc (no tcp connection to its port)
        assert any(remote == (here, rpc + 10) for _, remote in tcp_sockets(pids["EngineCore_DP0_PP0_TP0"]))
        for name, rank in (("EngineCore_DP0_PP1_TP0", 2), ("EngineCore_DP0_PP1_TP1", 3)):
            conns = tcp_sockets(pids[name])
            assert (driver, rpc + 100 + 2 * rank) in {remote for _, remote in conns}, (name, conns)
        assert not any(remote[1] == rpc + 102 for _, remote in tcp_sockets(pids["EngineCore_DP0_PP0_TP1"]))


@pytest.fixture(scope="module")
def elastic_expected(skewed_dir):
    """transformers' texts for test_elastic_ep's traffic (its batch prompts, its stream's two lengths)."""
    return oracle_texts(skewed_dir)      # test_elastic_ep's checkpoint: its oracle's texts, computed once


def _groups_by_node(ray) -> dict[str, str]:
    """Ray's state: each live placement group's id and the address of the node holding its bundles."""
    address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    return {pg_id: address[pg["bundles_to_node_id"][0]] for pg_id, pg in ray.util.placement_group_table().items()
            if pg["state"] == "CREATED"}


def _until(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return got


def _scale_through_ray(cluster, s: Server, model: str, expected, rpc: int) -> None:
    """Elastic EP with the DP cores on Ray: 400 for no room, 2 -> 3 on a node with room, 3 -> 2 giving its
    group back, a new actor killed in the exchange (500, the old size kept); traffic throughout."""
    import ray
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=180)
        before, cpus = _groups_by_node(ray), ray.available_resources()["CPU"]
        free = sorted((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), reverse=True)
        r = _scale(s.url, {"new_data_parallel_size": 5})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == (
            "new_data_parallel_size 5 is too large: the Ray cluster lacks the devices: 3 group(s) of 1 x 'CPU' each on "
            f"one node (3 in all) are needed, its nodes have {[f - 1 for f in free[:2]] + free[2:]} free (ray status "
            "shows them)"), r.text

        _scale_with_traffic(s, client, model, expected, 3)
        grown = _groups_by_node(ray)
        (new_group,) = set(grown) - set(before)
        here = _placed(s.output())[2]
        assert grown[new_group] in ("127.0.0.2", "127.0.0.3") and grown[new_group] != here, grown
        pids, _, _, nodes = _placed(s.output())          # the scale-up's placement is the last one logged
        assert len(nodes) == 3 and nodes[2] == grown[new_group], nodes
        remotes = {remote for _, remote in tcp_sockets(pids["EngineCore_DP2"])}
        assert {(nodes[0], rpc), (nodes[0], rpc + 1), (here, rpc + 10), (here, rpc + 11)} <= remotes, remotes
        assert _requests_per_rank(s.url).get("2", 0) > 0        # the new rank was routed to
        assert _until(lambda: ray.available_resources().get("CPU", 0) == cpus - 1)     # its group holds a device

        _scale_with_traffic(s, client, model, expected, 2)
        _until(lambda: set(_groups_by_node(ray)) == set(before))    # its placement group given back,
        _until(lambda: ray.available_resources().get("CPU", 0) == cpus)     # its device free again
        assert "DP rank 2 handed its experts over and leaves" in s.output()

        # the new actor killed in the expert exchange, under a stream and batches (they need no stream across it:
        # the scales above had one)
        stream, load = _Stream(client, model), _Load(client, model, expected[0])
        r = _scale(s.url, {"new_data_parallel_size": 3})
        assert r.status_code == 500 and "still 2 data parallel engines" in r.json()["error"]["message"], r.text
        assert "EPPLAT_ELASTIC_KILL_AT=exchange:3: rank killed at exchange" in s.output()
        rounds = load.rounds
        _until(lambda: load.rounds > rounds, 60)          # a batch after the failed scale, on the two ranks
        load.stop()
        assert stream.result() == expected[1] and load.failures == [], load.failures
        _until(lambda: set(_groups_by_node(ray)) == set(before) and ray.available_resources().get("CPU", 0) == cpus)
        assert _requests_per_rank(s.url)["size"] == 2
    finally:
        ray.shutdown()


def test_dp_cores_placed_by_ray_scaled_then_a_killed_actor(cluster, skewed_dir, elastic_expected):
    model = str(skewed_dir)
    rpc = _rpc_port(3)
    env = {"RAY_ADDRESS": cluster.address, "EPPLAT_ELASTIC_KILL_AT": "exchange:3"}   # the third scale's new rank
    with Server(model, "--dtype", "float32", "-dp", "2", "-ep", "--data-parallel-backend", "ray",
                "--enable-elastic-ep", "--max-num-seqs", "8", "--distributed-timeout-seconds", "60",
                "--max-model-len", "4096", "--data-parallel-rpc-port", str(rpc), env=env, timeout=300) as s:
        log = s.output()
        assert "Ray placed 2 engine process(es) in 2 placement group(s) of 1 x CPU on 2 node(s)" in log, log[-3000:]
        assert complete(s.url, model) == expected_texts(model, PROMPTS, 8)
        # world rank 0 serves the store and the wake channel on its node's address; DP rank 1 reaches the wake
        # channel there and the API server on this node's address
        pids, _, here, nodes = _placed(log)
        assert nodes[0] != nodes[1], nodes
        listening = {local for local, _ in tcp_sockets(pids["EngineCore_DP0"], "0A")}
        assert {(nodes[0], rpc), (nodes[0], rpc + 1), (nodes[0], rpc + 2)} <= listening, listening
        remotes = {remote for _, remote in tcp_sockets(pids["EngineCore_DP1"])}
        assert {(nodes[0], rpc + 1), (nodes[0], rpc + 2), (here, rpc + 10), (here, rpc + 11)} <= remotes, remotes
        _scale_through_ray(cluster, s, model, elastic_expected, rpc)
        pid = int(re.search(r"EngineCore_DP1 pid (\d+) on node", log).group(1))
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = c.completions.create(model=model, prompt="die", max_tokens=4000, stream=True,
                                      extra_body={"ignore_eos": True})
        got, error, finished = 0, None, False
        poller = HealthPoller(s.url)
        try:
            for chunk in stream:
                got += 1
                if got == 3:
                    poller.start()
                    os.kill(pid, signal.SIGKILL)          # the actor's process, as a lost node or OOM kill ends it
                if chunk.choices and chunk.choices[0].finish_reason:
                    finished = True
        except (openai.APIError, httpx.HTTPError) as e:
            error = e
        assert error is not None and not finished, f"stream ended normally after {got} chunks"
        assert poller.first_change() == 503, poller.seen


def _ray_cfg(model, **par) -> EngineConfig:
    return EngineConfig(ModelConfig(str(model), dtype="float32"), ParallelConfig(**par))


def test_a_cluster_without_the_devices_is_one_line(cluster, qwen3_moe_dir):
    r = subprocess.run([sys.executable, "-m", "epplat.cli", "serve", str(qwen3_moe_dir), "-tp", "4",
                        "--distributed-executor-backend", "ray"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RAY_ADDRESS": cluster.address})
    assert r.returncode == 1
    assert re.search(r"^epplat serve: error: the Ray cluster lacks the devices: 1 group\(s\) of 4 x 'CPU' each on one "
                     r"node \(4 in all\) are needed, its nodes have \[2\.0, 2\.0, 0(\.0)?\] \(ray status shows them\)$",
                     r.stderr.strip().splitlines()[-1]), r.stderr[-3000:]


def test_ray_missing_is_one_line(qwen3_moe_dir, monkeypatch):
    from epplat.core.distributed.ray_launcher import start_ray_engines
    from epplat.platforms.cpu.platform import CpuPlatform
    monkeypatch.setitem(sys.modules, "ray", None)         # as when ray is not installed: import ray fails
    with pytest.raises(ConfigError, match=r"^the Ray backends need ray: pip install 'epplat\[ray\]'$"):
        start_ray_engines(_ray_cfg(qwen3_moe_dir, data_parallel_backend="ray"), CpuPlatform)


def test_ray_layouts_that_do_not_run_are_one_line():
    with pytest.raises(ConfigError, match="--distributed-executor-backend ray / --data-parallel-backend ray place"):
        ParallelConfig(data_parallel_size=2, data_parallel_size_local=1, headless=True,
                       data_parallel_address="10.0.0.1", internal_secret="s", distributed_executor_backend="ray")
