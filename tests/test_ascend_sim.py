"""The ascend platform on a SIMULATED torch_npu / torchair (tests/simulations/npu: "npu" tensors live on the CPU,
"hccl" is gloo underneath): platform selection, the missing-CANN line, the HCCL all2all backend against
the single-process reference, --additional-config parsing and its one-line errors, the HCCL environment,
and greedy tokens equal to transformers' from real `epplat serve` processes with DP=2 and EP over the
simulated HCCL."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile

import openai
import pytest
import torch

import simulations
from hf_oracle import hf_greedy
from server_utils import Server

SIM_ENV = simulations.env("npu")


def epplat(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "epplat.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(r, needle: str) -> None:
    assert r.returncode != 0, r.stdout
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and needle in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_platform_selection_on_the_simulation():
    code = ("from epplat.plugins import registry; r = registry(); print(r.pick_platform('auto')); "
            "print(r.by_kind['platform']['ascend'].load().default_all2all)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **SIM_ENV}).stdout.split()
    assert out == ["ascend", "hccl"]
    listing = epplat("plugins", env=SIM_ENV).stdout
    lines = {ln.split()[0]: ln for ln in listing.splitlines() if ln.startswith("  ") and ln.split()}
    for name in ("ascend", "hccl", "torchair"):
        assert "unusable" not in lines[name] and "usable" in lines[name], lines[name]
    assert "[ascend]" in lines["hccl"] and "[ascend]" in lines["torchair"]


def test_missing_cann_library_is_one_line(qwen3_moe_dir):
    env = {**SIM_ENV, "SIM_NPU_BROKEN_CANN": "1"}
    listing = epplat("plugins", env=env).stdout
    line = next(ln for ln in listing.splitlines() if ln.split()[:1] == ["ascend"])
    assert "unusable: torch_npu failed to load: libhccl.so: cannot open shared object file" in line
    one_error_line(epplat("serve", str(qwen3_moe_dir), "--platform", "ascend", env=env), "libhccl.so")


# -- HCCL all2all over the simulated hccl backend ------------------------------------------------------------
def _all2all_worker(rank: int, world: int, init: str, tokens: list, result_dir: str) -> None:
    import torch_npu  # noqa: F401  (the simulation: registers "npu" and "hccl")
    import torch.distributed as dist

    from epplat.core.moe.all2all import ExpertMap
    from epplat.core.moe.experts import reference_experts
    from epplat.platforms.ascend.all2all_hccl import HcclAll2All
    dist.init_process_group("hccl", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    experts, hidden, inter, k = 8, 16, 24, 2
    w13, w2 = torch.randn(experts, hidden, 2 * inter), torch.randn(experts, inter, hidden)
    emap = ExpertMap(experts, rank, world)
    backend = HcclAll2All(emap, group=dist.group.WORLD, device=torch.device("npu", rank))
    local = emap.local_ids
    for step, counts in enumerate(tokens):
        g = torch.Generator().manual_seed(100 * step + rank)
        n = counts[rank]
        x = torch.randn(n, hidden, generator=g)
        ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)]) if n else \
            torch.empty(0, k, dtype=torch.long)
        w = torch.rand(n, k, generator=g)
        recv = backend.dispatch(x.to("npu"), ids.to("npu"), w.to("npu"))
        assert recv.topk_ids.shape[1] == 1 and bool((recv.topk_ids >= 0).all())
        y = reference_experts(recv.x, recv.topk_ids, recv.topk_weights, w13[local.start:local.stop],
                              w2[local.start:local.stop], torch.nn.functional.silu)
        out = backend.combine(y)
        ref = reference_experts(x, ids, w, w13, w2, torch.nn.functional.silu)
        torch.save((out, ref), os.path.join(result_dir, f"r{rank}s{step}.pt"))
    for host in (torch.zeros(2), torch.zeros(2, device="npu").cpu()):     # as HCCL, the group refuses host memory
        try:
            dist.all_reduce(host)
            raise AssertionError("an hccl group took a CPU tensor")
        except RuntimeError as e:
            assert "Tensors must be NPU and dense" in str(e), e
    dist.destroy_process_group()


def test_hccl_all2all_matches_the_single_process_reference(tmp_path, simulation):
    """The hccl all2all on the SIMULATED "hccl" group (which, as HCCL, refuses CPU tensors) equals the reference."""
    world = 2
    tokens = [[5, 3], [0, 4], [7, 0]]             # uneven, and ranks with no token (dummy steps)
    init = f"file://{tempfile.mkdtemp()}/store"
    simulation("npu")
    torch.multiprocessing.spawn(_all2all_worker, args=(world, init, tokens, str(tmp_path)), nprocs=world)
    for rank in range(world):
        for step, counts in enumerate(tokens):
            out, ref = torch.load(tmp_path / f"r{rank}s{step}.pt")
            assert out.shape == (counts[rank], 16)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# -- --additional-config ---------------------------------------------------------------------------------------
def test_additional_config_parsing():
    from epplat.config import ConfigError
    from epplat.platforms.ascend.ascend_config import parse
    cfg = parse({"torchair_graph_config": {"enabled": True, "graph_batch_sizes": [4, 8], "use_cached_graph": True,
                                           "enable_multistream_moe": True, "enable_super_kernel": True},
                 "ascend_scheduler_config": {"enabled": True}, "enable_weight_nz_layout": True})
    g = cfg.torchair_graph_config
    assert g.enabled and g.graph_batch_sizes == [4, 8] and g.use_cached_graph and g.enable_super_kernel
    assert cfg.ascend_scheduler_config.enabled and not cfg.ascend_scheduler_config.enable_chunked_prefill
    assert cfg.enable_weight_nz_layout and not cfg.enable_prefill_optimizations
    assert parse({}) == parse({"torchair_graph_config": {}})
    bad = [
        ({"torchair_graph_config": {"enabeld": True}}, "unknown field `enabeld` - at `$.torchair_graph_config`"),
        ({"graph_mode": True}, "unknown field `graph_mode`"),
        ({"torchair_graph_config": {"enabled": "true"}}, "Expected `bool`, got `str`"),
        ({"torchair_graph_config": {"enabled": True, "graph_batch_sizes": 8}}, "Expected `array`"),
        ({"torchair_graph_config": {"enabled": True, "graph_batch_sizes": [0]}}, "must be positive"),
        ({"torchair_graph_config": {"use_cached_graph": True}}, "use_cached_graph is valid only when"),
        ({"torchair_graph_config": {"enabled": True, "enable_super_kernel": True}}, "needs enable_multistream_moe"),
        ({"ascend_scheduler_config": {"enabled": True, "policy": "fcfs"}}, "unknown field `policy`"),
    ]
    for raw, needle in bad:
        with pytest.raises(ConfigError, match=None) as e:
            parse(raw)
        assert needle in str(e.value) and "\n" not in str(e.value), (raw, e.value)
    with pytest.raises(ConfigError, match="exclude each other"):
        parse({"torchair_graph_config": {"enabled": True}}, enforce_eager=True)


@pytest.mark.parametrize("flags, env, needle", [
    (["--additional-config", "{oops"], {}, "--additional-config: not valid JSON"),
    (["--additional-config", "[1]"], {}, "--additional-config: must be a JSON object"),
    (["--platform", "cpu", "--additional-config", '{"torchair_graph_config": {"enabled": true}}'], {},
     "platform 'cpu' takes no keys; got torchair_graph_config"),
    (["--platform", "ascend", "--additional-config", '{"torchair_graph_config": {"enabled": true, "x": 1}}'],
     SIM_ENV, "unknown field `x`"),
    (["--platform", "ascend", "--max-model-len", "2048", "--max-num-batched-tokens", "512", "--additional-config",
      '{"ascend_scheduler_config": {"enabled": true}}'], SIM_ENV, "ascend_scheduler_config runs prefills whole"),
])
def test_additional_config_errors_are_one_line(qwen3_moe_dir, flags, env, needle):
    one_error_line(epplat("serve", str(qwen3_moe_dir), *flags, env=env), needle)


def test_hccl_environment_checks():
    from epplat.config import ConfigError
    from epplat.platforms.ascend.hccl_env import check
    good = {"HCCL_IF_IP": "127.0.0.1", "HCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo",
            "HCCL_BUFFSIZE": "1024", "HCCL_DETERMINISTIC": "True", "OTHER": "x"}
    assert check(good) == ["HCCL_IF_IP=127.0.0.1", "HCCL_SOCKET_IFNAME=lo", "GLOO_SOCKET_IFNAME=lo",
                           "HCCL_BUFFSIZE=1024", "HCCL_DETERMINISTIC=True"]
    for env, needle in [({"HCCL_IF_IP": "node1"}, "not an IPv4 address"),
                        ({"HCCL_IF_IP": "203.0.113.9"}, "not an address of this node"),
                        ({"HCCL_BUFFSIZE": "1G"}, "HCCL_BUFFSIZE='1G' is not a positive integer (MB)"),
                        ({"HCCL_EXEC_TIMEOUT": "0"}, "HCCL_EXEC_TIMEOUT='0'"),
                        ({"HCCL_DETERMINISTIC": "yes"}, "must be true or false"),
                        ({"GLOO_SOCKET_IFNAME": "lo,nosuchnic9"}, "no network card 'nosuchnic9'")]:
        with pytest.raises(ConfigError) as e:
            check(env)
        assert needle in str(e.value)


# -- serving on the simulated NPU: DP=2, EP over the simulated HCCL ----------------------------------------------
PROMPTS = [[5, 17, 99, 230, 7, 64, 300, 12], [400, 401, 402], list(range(100, 130)), [3, 9], [1500, 1200, 900]]


def test_serve_dp2_ep_on_simulated_npu_matches_transformers(qwen3_moe_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    expected = [tok.decode(r, skip_special_tokens=True) for r in hf_greedy(qwen3_moe_dir, PROMPTS, 8, ignore_eos=True)]
    env = {**SIM_ENV, "HCCL_IF_IP": "127.0.0.1", "HCCL_BUFFSIZE": "1024", "GLOO_SOCKET_IFNAME": "lo"}
    with Server(str(qwen3_moe_dir), "--platform", "ascend", "--dtype", "float32", "-dp", "2", "-ep",
                "--max-model-len", "256", env=env) as s:
        async def go():
            c = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
            rs = await asyncio.gather(*(c.completions.create(model=str(qwen3_moe_dir), prompt=p, max_tokens=8,
                                                             temperature=0, extra_body={"ignore_eos": True})
                                        for p in PROMPTS))
            return [r.choices[0].text for r in rs]
        assert asyncio.run(go()) == expected
        log = s.output()
    assert "platform ascend" in log and log.count("all2all hccl") == 2
    assert "EP rank 0/2 holds experts 0-3 of 8" in log and "EP rank 1/2 holds experts 4-7 of 8" in log
    assert "[DP rank 1] NPU KV cache size" in log
    assert "HCCL environment: HCCL_IF_IP=127.0.0.1 GLOO_SOCKET_IFNAME=lo HCCL_BUFFSIZE=1024" in log


def test_npu_memory_budget_too_small_is_one_line(qwen3_moe_dir):
    # the simulated NPU reports the host's memory, all of it used outside torch
    r = epplat("serve", str(qwen3_moe_dir), "--platform", "ascend", "--gpu-memory-utilization", "0.001",
               "--max-model-len", "256", env=SIM_ENV)
    one_error_line(r, "no NPU memory left for the KV cache: raise --gpu-memory-utilization (0.001)")
    assert "Memory profiling:" in r.stderr and "outside torch" in r.stderr


def _memory_worker(_rank: int, model_dir: str) -> None:
    import torch_npu  # noqa: F401  (the simulation, imported in this worker only)

    from epplat.config import CacheConfig, EngineConfig, ModelConfig
    from epplat.core.engine.model_runner import ModelRunner
    from epplat.plugins import registry
    npu, mib = torch.npu, 1 << 20
    cfg = EngineConfig(model=ModelConfig(model=model_dir, dtype="float32"), platform="ascend",
                       cache=CacheConfig(gpu_memory_utilization=0.5))
    platform = registry().load("platform", "ascend")()
    platform.configure(cfg)
    base = npu.memory_allocated()
    runner = ModelRunner(cfg, platform, platform.device(0))
    held = npu.memory_allocated()
    assert held - base >= runner.weight_bytes > 0, (base, held)         # the weights live on the device

    def profile():                   # an 8 MiB scratch cache kept to the end, a 3 MiB activation freed before
        scratch = torch.zeros(8 * mib, dtype=torch.uint8, device=runner.device)
        activation = torch.empty(3 * mib, dtype=torch.uint8, device=runner.device)
        del activation
        return scratch.nbytes
    assert platform.kv_cache_bytes(cfg.cache, runner.weight_bytes, runner.device, profile) == (512 - 3) * mib - held
    assert npu.memory_allocated() == held and npu.max_memory_allocated() == held + 11 * mib
    blocks = runner.num_blocks_from_memory(256)             # the real profiling run: the largest step
    assert npu.memory_allocated() == held, "the profiling run left tensors on the device"
    assert npu.max_memory_allocated() > held                # its scratch cache and inputs were on the device
    assert 0 < blocks * runner.kv_bytes_per_block() <= 512 * mib - held


def test_npu_memory_queries_count_what_torch_holds_and_the_kv_budget_takes_off_activations(
        one_layer_moe, simulation, monkeypatch):
    """SIMULATED torch_npu on a 1 GiB device (SIM_NPU_HBM_BYTES): memory_allocated / max_memory_allocated count the
    storages made on it, as torch_npu's allocator statistics do. The platform's KV budget is half of it (at
    --gpu-memory-utilization 0.5) less what torch holds and less the profile's peak activations (not its scratch
    cache); a real engine's profiling run leaves nothing behind."""
    simulation("npu")
    monkeypatch.setenv("SIM_NPU_HBM_BYTES", str(1 << 30))
    torch.multiprocessing.spawn(_memory_worker, args=(str(one_layer_moe),), nprocs=1)


def test_torchair_graphs_dp2_ep_decode_equal_to_eager(qwen3_moe_dir):
    """Decode steps through torchair (torch.compile on the simulated npu backend), DP=2 + EP: the same tokens
    as eager. bfloat16: torch.compile cannot trace the CPU reference experts' float32 grouped GEMM."""
    prompts = PROMPTS[:3]    # over 2 ranks: decode batches of 2 (the graph) and 1 (padded to 2)
    base = (str(qwen3_moe_dir), "--platform", "ascend", "--dtype", "bfloat16", "-dp", "2", "-ep", "--max-model-len",
            "256")

    def complete(url):
        async def go():
            c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            rs = await asyncio.gather(*(c.completions.create(model=str(qwen3_moe_dir), prompt=p, max_tokens=6,
                                                             temperature=0, extra_body={"ignore_eos": True})
                                        for p in prompts))
            return [r.choices[0].text for r in rs]
        return asyncio.run(go())

    with Server(*base, env=SIM_ENV) as s:
        eager = complete(s.url)
    graphs = '{"torchair_graph_config": {"enabled": true, "graph_batch_sizes": [2]}}'
    with Server(*base, "--additional-config", graphs, env=SIM_ENV, timeout=300) as s:
        assert complete(s.url) == eager
        log = s.output()
    assert log.count("torchair graphs for decode batch sizes [2]") == 2


_GRAPHS = r"""
import json, sys, torch, torch_npu, torchair
from epplat.config import CacheConfig, EngineConfig, ModelConfig
from epplat.core.engine.core import init_kv_cache
from epplat.core.engine.model_runner import ModelInput, ModelRunner
from epplat.core.model.attention import build_attn_metadata
from epplat.plugins import registry
model = sys.argv[1]
torch._dynamo.config.recompile_limit = int(sys.argv[3])   # dynamo's default is 8
for kv_mib, graphs in json.loads(sys.argv[2]):      # one engine after the other, in this process
    cfg = EngineConfig(model=ModelConfig(model=model, dtype="bfloat16"), platform="ascend",
                       cache=CacheConfig(kv_cache_memory_bytes=kv_mib << 20), additional_config={
                           "torchair_graph_config": {"enabled": True, **graphs}})
    platform = registry().load("platform", "ascend")()
    platform.configure(cfg)
    before = len(torchair.calls)
    runner = ModelRunner(cfg, platform, platform.device(0))
    init_kv_cache(runner, cfg, runner.ps)
    mi = ModelInput([5, 9, 11], [3, 7, 2], [(4, 1, [0]), (8, 1, [1]), (3, 1, [2])])   # 3 decodes: padded to 4
    graph = runner.forward(mi)
    with torch.inference_mode():
        eager = runner.model(torch.tensor(mi.token_ids), torch.tensor(mi.positions),
                             build_attn_metadata(mi.seqs, runner.block_size, runner.device, runner.pad_block))
    assert torch.equal(graph, eager), (graph - eager).abs().max()
    calls = torchair.calls[before:]
    print(json.dumps({"cache_compile": [c[1] for c in calls if c[0] == "cache_compile"],
                      "frozen": all(c[2].experimental_config.frozen_parameter for c in calls
                                    if c[0] == "cache_compile"),
                      "reloaded": [c[1] for c in calls if c[0] == "cache_reload"],
                      "graphs": sum(c[0] == "graph" for c in calls), "first": calls[0][0]}))
"""


@pytest.fixture(scope="module")
def one_layer_moe(tmp_path_factory):
    """The torchair tests' checkpoint: one MoE layer (each graph traces the whole model, so layers cost compile time)."""
    from epplat.tools.make_model import make_model
    return make_model("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe_1l"), layers=1, hidden=64, experts=8, top_k=2,
                      heads=4, kv_heads=2, head_dim=32, moe_intermediate=64, vocab_size=2048, seed=1)


def _graphs(model_dir, runs: list, cache_home, recompile_limit: int = 8) -> tuple[list, str]:
    """Engines with torchair graphs, one per (KV cache MiB, torchair_graph_config) of `runs`, one after the
    other in one process whose dynamo recompiles a frame at most `recompile_limit` times: what each compiled,
    reloaded and captured, and the process's stderr."""
    r = subprocess.run([sys.executable, "-c", _GRAPHS, str(model_dir), json.dumps(runs), str(recompile_limit)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, **SIM_ENV, "TORCHAIR_CACHE_HOME": str(cache_home)})
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.strip().splitlines()[-len(runs):]], r.stderr


CACHED = {"graph_batch_sizes": [1, 4], "use_cached_graph": True}


@pytest.fixture(scope="module")
def first_start(one_layer_moe, tmp_path_factory):
    """One process, two engines: cached graphs with a 64 MiB KV cache (a cache on disk after), then graphs
    for three decode batch sizes, one past dynamo's recompile limit (lowered from 8 to 2, so three compiles
    show what nine would)."""
    home = tmp_path_factory.mktemp("torchair_cache")
    (cached, many), err = _graphs(one_layer_moe, [[64, CACHED], [64, {"graph_batch_sizes": [1, 2, 3]}]], home,
                                  recompile_limit=2)
    return home, cached, many, err


def test_torchair_cached_graphs_capture_whole_and_reload_per_kv_shape(one_layer_moe, first_start):
    """torchair's cache_compile compiles whole graphs (the simulation, like torchair, with fullgraph=True: a host
    sync in the decode step fails the capture) and reloads its cache without guards on restart: a restart with
    another KV cache size must not reload the graphs of the first, the same size must."""
    home, first, _, _ = first_start
    assert first["cache_compile"] == ["forward_decode_bs4", "forward_decode_bs1"] and first["frozen"], first
    assert first["reloaded"] == [] and first["graphs"] == 2 and first["first"] == "patch_for_hcom", first
    # a restart: the first size reloads both graphs, then another KV size in the same process compiles anew
    (again, other), _ = _graphs(one_layer_moe, [[64, CACHED], [32, CACHED]], home)
    assert again["reloaded"] == ["forward_decode_bs4", "forward_decode_bs1"] and again["graphs"] == 0, again
    assert other["reloaded"] == [] and other["graphs"] == 2, other


def test_torchair_graphs_for_more_batch_sizes_than_the_recompile_limit(first_start):
    """More decode batch sizes than dynamo's recompile limit (three, the limit lowered to 2; the default
    list has up to 20 sizes against a limit of 8): every one is compiled, none silently eager."""
    _, _, many, err = first_start
    assert "recompile_limit" not in err and "run eagerly" not in err, err[-3000:]
    assert many["graphs"] >= 3, many


def test_torchair_cached_graphs_refuse_host_syncs(qwen3_moe_dir):
    graphs = '{"torchair_graph_config": {"enabled": true, "use_cached_graph": true}}'
    one_error_line(epplat("serve", str(qwen3_moe_dir), "--platform", "ascend", "-dp", "2", "-ep",
                          "--additional-config", graphs, env=SIM_ENV),
                   "use_cached_graph compiles whole decode graphs, which expert parallelism")
