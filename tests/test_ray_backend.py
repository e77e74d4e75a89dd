"""The Ray backends on one machine with simulated nodes (ray.cluster_utils.Cluster: a head with no
CPUs and two nodes of 2 CPUs each; on the cpu platform a device is one CPU): PP=2 x TP=2 placed by
Ray (each stage's TP ranks on one node, the stages on both), DP cores placed by Ray; greedy tokens
equal transformers' through HTTP and the openai client; a killed actor turns /health to 503 and
ends in-flight requests with an error, as with mp. A cluster without the devices, and ray missing,
are one line. One cluster for the whole module (Ray's start-up is the costly part)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import openai
import pytest

from epplat.config import ConfigError, EngineConfig, ModelConfig, ParallelConfig
from server_utils import HealthPoller, Server
from test_parallel import PROMPTS, complete, expected_texts


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        c.add_node(num_cpus=2)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def test_pp2_tp2_placed_by_ray(cluster, qwen3_moe_dir):
    model = str(qwen3_moe_dir)
    with Server(model, "--dtype", "float32", "-pp", "2", "-tp", "2", "--distributed-executor-backend", "ray",
                "--max-model-len", "256", env={"RAY_ADDRESS": cluster.address}, timeout=300) as s:
        log = s.output()
        assert "Ray placed 4 engine process(es) in 2 placement group(s) of 2 x CPU on 2 node(s)" in log, log[-3000:]
        # each stage's TP ranks share a node, the two stages are on the two nodes
        node = dict(re.findall(r"(EngineCore_DP0_PP\d_TP\d) pid \d+ on node (\d)", log))
        assert node["EngineCore_DP0_PP0_TP0"] == node["EngineCore_DP0_PP0_TP1"] != node["EngineCore_DP0_PP1_TP0"] \
            == node["EngineCore_DP0_PP1_TP1"], node
        assert complete(s.url, model) == expected_texts(model, PROMPTS, 8)


def test_dp_cores_placed_by_ray_then_a_killed_actor(cluster, qwen3_moe_dir):
    model = str(qwen3_moe_dir)
    with Server(model, "--dtype", "float32", "-dp", "2", "-ep", "--data-parallel-backend", "ray",
                "--max-model-len", "4096", env={"RAY_ADDRESS": cluster.address}, timeout=300) as s:
        log = s.output()
        assert "Ray placed 2 engine process(es) in 2 placement group(s) of 1 x CPU on 2 node(s)" in log, log[-3000:]
        assert complete(s.url, model) == expected_texts(model, PROMPTS, 8)
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
