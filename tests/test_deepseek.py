"""DeepSeek-V2/V3 (MLA, DeepSeek routing, shared experts) served on the cpu platform: greedy
tokens through HTTP and the openai client equal transformers' DeepseekV2ForCausalLM /
DeepseekV3ForCausalLM on `epplat make-model` checkpoints, and the KV cache holds one latent
"head" (kv_lora_rank + qk_rope_head_dim values) per token and layer."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

import simulations
from hf_oracle import hf_greedy
import threading

from server_utils import Server, kill_headless, rpc_port, start_headless
from test_parallel import MAX_TOKENS, complete, per_rank_requests

# the long prompt is prefilled in chunks of 32 (a chunk attending to cached latents)
PROMPTS = [[5, 17, 99, 230, 7, 64, 300, 12], [400, 401, 402], list(range(100, 170)), [3, 9],
           [1500, 1200, 900], [77] * 6, [1024, 12, 512], [250, 260, 270, 280]]
DIMS = dict(layers=2, hidden=64, top_k=2, heads=4, head_dim=16, moe_intermediate=32, intermediate=96,
            kv_lora_rank=32, rope_head_dim=8, vocab_size=2048)


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory):
    """V2-Lite style: plain q projection, softmax routing, greedy top-k, two shared experts."""
    from epplat.tools.make_model import make_model
    return make_model("deepseek_v2", tmp_path_factory.mktemp("deepseek_v2"), experts=8, seed=3, **DIMS)


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    """V3 style: q_lora_rank, sigmoid + e_score_correction_bias, 4 groups (top 2), one shared expert."""
    from epplat.tools.make_model import make_model
    return make_model("deepseek_v3", tmp_path_factory.mktemp("deepseek_v3"), experts=8, seed=4, q_lora_rank=32,
                      **DIMS)


def expected(model_dir, prompts=PROMPTS):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok.decode(r, skip_special_tokens=True) for r in hf_greedy(model_dir, prompts, MAX_TOKENS, ignore_eos=True)]


def test_checkpoints_load_in_transformers_with_every_tensor(v2_dir, v3_dir):
    from transformers import AutoModelForCausalLM
    for d, cls in ((v2_dir, "DeepseekV2ForCausalLM"), (v3_dir, "DeepseekV3ForCausalLM")):
        model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
        assert type(model).__name__ == cls and not any(info.values()), info
    v3 = AutoModelForCausalLM.from_pretrained(v3_dir, dtype=torch.float32)
    bias = v3.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0                  # the correction bias is loaded, not left at zero


def _latent_cache_logged(log: str) -> None:
    # 2 layers x (32 latent + 8 rotary) float32 = 320 bytes per token: 10240 tokens in 3,276,800 bytes
    # (decompressed keys and values would take 2 layers x 4 heads x (24 + 16) x 4 = 1280 bytes per token)
    assert "KV cache size: 10,240 tokens" in log, log
    assert re.search(r"Maximum concurrency for 256 tokens per request: 40\.00x", log), log


def test_single_process_matches_transformers_and_caches_the_latent(v3_dir):
    with Server(str(v3_dir), "--dtype", "float32", "--max-model-len", "256", "--max-num-batched-tokens", "32",
                "--kv-cache-memory-bytes", "3276800", "--served-model-name", "ds") as s:
        assert complete(s.url, "ds", PROMPTS) == expected(v3_dir)
        _latent_cache_logged(s.output())


@pytest.fixture(scope="module")
def v3_uneven_dir(tmp_path_factory):
    """10 routed experts in 2 groups: over 4 EP ranks the first two hold 3, the others 2."""
    from epplat.tools.make_model import make_model
    return make_model("deepseek_v3", tmp_path_factory.mktemp("deepseek_v3_uneven"), experts=10, seed=5,
                      q_lora_rank=32, n_group=2, topk_group=1, **DIMS)


def test_tensor_parallel_2_splits_mla_heads(v2_dir):
    """V2-Lite style (plain q, softmax routing), MLA heads split over 2 ranks; the latent cache is replicated."""
    with Server(str(v2_dir), "--dtype", "float32", "-tp", "2", "--max-model-len", "256",
                "--max-num-batched-tokens", "32", "--kv-cache-memory-bytes", "3276800", "--served-model-name", "ds") as s:
        assert complete(s.url, "ds", PROMPTS) == expected(v2_dir)
        _latent_cache_logged(s.output())


def test_dp2_tp2_ep_with_experts_that_do_not_divide(v3_uneven_dir):
    with Server(str(v3_uneven_dir), "--dtype", "float32", "-dp", "2", "-tp", "2", "-ep", "--max-model-len", "256",
                "--served-model-name", "ds", timeout=180) as s:
        assert complete(s.url, "ds", PROMPTS) == expected(v3_uneven_dir)
        log = s.output()
    for needle in ("EP rank 0/4 holds experts 0-2 of 10", "EP rank 1/4 holds experts 3-5 of 10",
                   "EP rank 2/4 holds experts 6-7 of 10", "EP rank 3/4 holds experts 8-9 of 10"):
        assert needle in log, log


def test_pp2_dp2_ep_naive_all2all_eplb_with_redundant_experts(v3_dir):
    """PP=2 over 2 layers: stage 0 holds only the dense first layer (first_k_dense_replace=1), so it has no
    experts to balance; stage 1's MoE layer is expert-parallel over the DP ranks and EPLB rebalances it."""
    cfg = {"window_size": 8, "step_interval": 8, "num_redundant_experts": 2}
    with Server(str(v3_dir), "--dtype", "float32", "-pp", "2", "-dp", "2", "-ep", "--max-model-len", "256",
                "--all2all-backend", "naive", "--enable-eplb", "--eplb-config", json.dumps(cfg),
                "--served-model-name", "ds", timeout=300) as s:
        assert "EP rank 1/2 holds physical experts 5-9 of 10 (logical experts [5, 6, 7, 0, 1])" in s.output()
        want = expected(v3_dir)
        for _ in range(2):                       # a rebalance at step 8 in the first batch, more in the second
            assert complete(s.url, "ds", PROMPTS) == want
        assert re.search(r"EngineCore_DP0_PP1 [^\]]*\] EPLB rebalance \d+ at step", s.output()), s.output()[-3000:]


def _dp2_ep_flags(port):
    return ["--dtype", "float32", "--data-parallel-size", "2", "--data-parallel-address", "127.0.0.1",
            "--data-parallel-rpc-port", str(port), "--enable-expert-parallel", "--max-model-len", "256",
            "--served-model-name", "ds"]


def test_two_nodes_headless_dp2_ep(v2_dir):
    """DP=2 + EP over two "nodes" on loopback: the second node's engine started with --headless."""
    common = [*_dp2_ep_flags(rpc_port()), "--data-parallel-size-local", "1"]
    headless = start_headless(str(v2_dir), "--data-parallel-start-rank", "1", *common, env={"VLLM_HOST_IP": "127.0.0.1"})
    try:
        # the primary node names its address for internal traffic (vLLM's VLLM_HOST_IP, epplat's name first)
        env = {"EPPLAT_HOST_IP": "127.0.0.1", "VLLM_HOST_IP": "192.0.2.1"}
        with Server(str(v2_dir), *common, env=env, timeout=180) as primary:
            assert "internal traffic (gloo) on 127.0.0.1 (lo, from EPPLAT_HOST_IP)" in primary.output()
            assert complete(primary.url, "ds", PROMPTS) == expected(v2_dir)
            served = per_rank_requests(primary.url)
            assert set(served) == {"0", "1"} and all(v > 0 for v in served.values()), served
            assert "EP rank 0/2 holds experts 0-3 of 8" in primary.output()
    finally:
        kill_headless(headless)


def test_host_ip_names_the_interface_for_internal_traffic(monkeypatch):
    """EPPLAT_HOST_IP, else VLLM_HOST_IP, else the route towards the head; an address no interface holds is one line."""
    import os
    from epplat.config import ConfigError
    from epplat.core.distributed.parallel_state import bind_gloo_to, node_address
    keep = ("EPPLAT_HOST_IP", "VLLM_HOST_IP", "GLOO_SOCKET_IFNAME")
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in keep})
    assert node_address("127.0.0.1") == "127.0.0.1"
    os.environ["VLLM_HOST_IP"] = "192.0.2.1"                     # TEST-NET-1: on no interface here
    assert node_address("127.0.0.1") == "192.0.2.1"
    with pytest.raises(ConfigError, match=r"^VLLM_HOST_IP=192\.0\.2\.1 is not an address of this host's network "
                                          r"interfaces$"):
        bind_gloo_to(node_address("127.0.0.1"), named=True)
    os.environ["EPPLAT_HOST_IP"] = "127.0.0.1"
    bind_gloo_to(node_address("127.0.0.1"), named=True)
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"


def test_external_load_balancing_dp2_ep(v3_dir):
    """One `epplat serve` per DP rank (vLLM's --data-parallel-rank), each its own API server; EP spans both."""
    common = _dp2_ep_flags(rpc_port())
    servers = {}
    t = threading.Thread(target=lambda: servers.setdefault(1, Server(str(v3_dir), *common, "--data-parallel-rank", "1")))
    t.start()
    try:
        servers[0] = Server(str(v3_dir), *common, "--data-parallel-rank", "0")
        t.join(120)
        want, half = expected(v3_dir), len(PROMPTS) // 2
        assert complete(servers[0].url, "ds", PROMPTS[:half]) == want[:half]
        assert complete(servers[1].url, "ds", PROMPTS[half:]) == want[half:]
        assert per_rank_requests(servers[1].url) == {"1": half}
    finally:
        t.join(120)
        for srv in servers.values():
            srv.stop()


def test_expert_map_gives_the_first_ranks_one_more_and_even_backends_refuse():
    from epplat.core.moe.all2all import All2AllBackend, ExpertMap
    assert [list(ExpertMap(10, r, 4).local_ids) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert ExpertMap(8, 2, 3, num_redundant=1).local_ids == range(6, 9)
    with pytest.raises(ValueError, match="the base all2all backend needs the 10 experts to divide over the 4 EP"):
        All2AllBackend(ExpertMap(10, 0, 4))


def mtp_friendly(model_dir, scale: float) -> None:
    """Rewrite a checkpoint so that drafts often, but not always, agree with the target: attention and MLP
    outputs scaled by `scale` make the next token mostly a function of the current one, and the MTP layer
    (its eh_proj passing the next token's embedding through, the main model's embedding and head) applies
    that function to the next token. Random MTP weights would have every draft rejected."""
    from safetensors.torch import load_file, save_file
    path = model_dir / "model.safetensors"
    t = load_file(str(path))
    p = f"model.layers.{json.loads((model_dir / 'config.json').read_text())['num_hidden_layers']}."
    for k in t:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            t[k] = t[k] * scale
    h = t["model.embed_tokens.weight"].shape[1]
    t[p + "embed_tokens.weight"] = t["model.embed_tokens.weight"].clone()
    t[p + "eh_proj.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
    t[p + "enorm.weight"] = torch.ones(h)
    t[p + "shared_head.head.weight"] = t["lm_head.weight"].clone()
    t[p + "shared_head.norm.weight"] = t["model.norm.weight"].clone()
    save_file(t, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def v3_mtp_dir(tmp_path_factory):
    from epplat.tools.make_model import make_model
    d = make_model("deepseek_v3", tmp_path_factory.mktemp("deepseek_v3_mtp"), experts=8, seed=6, q_lora_rank=32,
                   mtp_layers=1, **DIMS)
    mtp_friendly(d, 0.3)
    return d


def test_mtp_speculative_decoding_tp2_keeps_greedy_output_and_reports_acceptance(v3_mtp_dir):
    """TP=2: the driver sends every draft pass to its TP worker too."""
    import httpx
    import openai
    from prometheus_client.parser import text_string_to_metric_families
    spec = json.dumps({"method": "deepseek_mtp", "num_speculative_tokens": 2})
    with Server(str(v3_mtp_dir), "--dtype", "float32", "-tp", "2", "--max-model-len", "256",
                "--max-num-batched-tokens", "32", "--speculative-config", spec, "--served-model-name", "ds", env={"EPPLAT_LOG_STATS_INTERVAL": "0"}) as s:
        want = expected(v3_mtp_dir)
        assert complete(s.url, "ds", PROMPTS) == want
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        chunks = client.completions.create(model="ds", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in chunks) == want[0]      # several tokens per step, streamed
        samples = {x.name: x.value for f in text_string_to_metric_families(httpx.get(s.url + "/metrics").text)
                   for x in f.samples}
        log = s.output()
    drafted, accepted = (samples[f"vllm:spec_decode_num_{w}_total"] for w in ("draft_tokens", "accepted_tokens"))
    assert samples["vllm:spec_decode_num_drafts_total"] > 0 and 0 < accepted < drafted, samples
    rates = [float(r) for r in re.findall(r"SpecDecoding metrics: .*Avg Draft acceptance rate: ([\d.]+)%", log)]
    assert rates and any(r > 0 for r in rates), log[-3000:]


@pytest.mark.parametrize("spec, needle", [
    ("{", "--speculative-config is not valid JSON"),
    ('{"method": "deepseek_mtp", "num_speculative_tokens": 1, "model": "x"}', "unknown key 'model'"),
    ('{"method": "eagle", "num_speculative_tokens": 1}', "method 'eagle' is not supported"),
    ('{"method": "deepseek_mtp", "num_speculative_tokens": 0}', "Expected `int` >= 1"),
    ('{"method": "deepseek_mtp"}', "missing required field `num_speculative_tokens`"),
])
def test_bad_speculative_configs_are_one_line(spec, needle):
    from epplat.config import ConfigError, SpeculativeConfig
    with pytest.raises(ConfigError, match=re.escape(needle)) as e:
        SpeculativeConfig.parse(spec)
    assert "\n" not in str(e.value)


def test_speculative_config_needs_mtp_layers(v3_dir):
    """EngineConfig.check refuses a speculative config the checkpoint cannot serve, with the one line
    `epplat serve` prints, for a config built in Python as for one built from flags."""
    from epplat.config import ConfigError, EngineConfig, ModelConfig, SpeculativeConfig
    from epplat.serve import add_cli, engine_config_from_args
    spec = '{"method": "deepseek_mtp", "num_speculative_tokens": 1}'
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    needle = "has none (num_nextn_predict_layers)"
    cfg = EngineConfig(ModelConfig(str(v3_dir)), speculative=SpeculativeConfig.parse(spec))
    with pytest.raises(ConfigError, match=re.escape(needle)) as built:
        cfg.check()
    args = parser.parse_args(["serve", str(v3_dir), "--speculative-config", spec, "--platform", "cpu"])
    with pytest.raises(ConfigError, match=re.escape(needle)) as flagged:
        engine_config_from_args(args)
    assert str(built.value) == str(flagged.value) and "\n" not in str(built.value)


def test_mtp_speculative_decoding_dp2_ep_in_lockstep(v3_mtp_dir):
    """DP=2 + EP: the MTP layer's experts are spread over both ranks, so every rank runs each draft pass
    (empty when it has nothing to draft) and the all2all collectives pair up; greedy output unchanged."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    spec = json.dumps({"method": "deepseek_mtp", "num_speculative_tokens": 2})
    with Server(str(v3_mtp_dir), "--dtype", "float32", "-dp", "2", "-ep", "--max-model-len", "256",
                "--speculative-config", spec, "--served-model-name", "ds", timeout=180) as s:
        want = expected(v3_mtp_dir)
        assert complete(s.url, "ds", PROMPTS) == want
        assert complete(s.url, "ds", PROMPTS[:1]) == want[:1]          # one rank drafts, the other runs empty passes
        samples = {x.name: x.value for f in text_string_to_metric_families(httpx.get(s.url + "/metrics").text)
                   for x in f.samples}
        assert "EP rank 1/2 holds experts 4-7 of 8" in s.output()
    drafted, accepted = (samples[f"vllm:spec_decode_num_{w}_total"] for w in ("draft_tokens", "accepted_tokens"))
    assert 0 < accepted < drafted, samples


def test_ascend_simulation_dp2_ep_hccl(v3_dir):
    """The ascend platform's path (SIMULATED torch_npu / HCCL, tests/simulations/npu): DP=2 + EP over the hccl
    all2all."""
    env = simulations.env("npu", HCCL_IF_IP="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
    with Server(str(v3_dir), "--platform", "ascend", "--dtype", "float32", "-dp", "2", "-ep", "--max-model-len", "256",
                "--served-model-name", "ds", env=env) as s:
        assert complete(s.url, "ds", PROMPTS) == expected(v3_dir)
        log = s.output()
    assert "platform ascend" in log and log.count("all2all hccl") == 2, log


_MLA_INTERPRETED = r'''
import torch, torch.nn.functional as F
from epplat.platforms.cuda.triton_mla import mla_decode_attention
torch.manual_seed(0)
B, H, R, DR, BS, NB = 3, 32, 64, 16, 16, 12
cache = torch.randn(NB + 2, BS, 1, R + DR)
lens = torch.tensor([5, 40, 17])
tables = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, NB]], dtype=torch.int32)
ql, qp = torch.randn(B, H, R), torch.randn(B, H, DR)
out = mla_decode_attention(ql, qp, cache, tables, lens, 0.1)
keys = cache.index_select(0, tables.view(-1).long()).view(B, 1, -1, R + DR)
mask = (torch.arange(keys.shape[2])[None, :] < lens[:, None])[:, None, None]
ref = F.scaled_dot_product_attention(torch.cat([ql, qp], -1).unsqueeze(2), keys, keys[..., :R], attn_mask=mask,
                                     scale=0.1, enable_gqa=True).squeeze(2)
assert (out - ref).abs().max() < 1e-5, (out - ref).abs().max()
for h in (4, 20):     # partial head groups (masked slots): a graph's wider table gives the same bits
    wide = torch.cat([tables, torch.full((B, 5), NB + 1, dtype=torch.int32)], 1)
    part = mla_decode_attention(ql[:, :h], qp[:, :h], cache, tables, lens, 0.1)
    assert torch.equal(part, mla_decode_attention(ql[:, :h], qp[:, :h], cache, wide, lens, 0.1))
    assert (part - ref[:, :h]).abs().max() < 1e-5, (h, (part - ref[:, :h]).abs().max())
# through the Kernels record: an MLA layer's decode step with the kernel equals the torch path
from epplat.core.distributed.parallel_state import ParallelState
from epplat.core.model import deepseek
from epplat.core.model.attention import build_attn_metadata
from epplat.core.model.mla import MLAttention
from epplat.core.ops import Kernels
hf = dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=64,
          qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=0, num_experts_per_tok=1,
          intermediate_size=64, vocab_size=64, max_position_embeddings=256)
cfg = deepseek.parse_config(hf)
rope = deepseek.DeepseekForCausalLM.make_rope(cfg)
outs = []
for k in (Kernels(), Kernels(mla_decode_attention=mla_decode_attention)):
    torch.manual_seed(1)
    attn = MLAttention(cfg, rope, ParallelState(), torch.float32, k)
    for prm in attn.parameters():
        prm.data.normal_(0, 0.2)
    attn.kv_cache = (torch.randn(NB + 2, BS, 1, 80),)
    seqs = [(ln, 1, t[: -(-ln // BS)]) for ln, t in ((5, [0]), (40, [3, 4, 5]), (17, [6, 7]))]
    meta = build_attn_metadata(seqs, BS, "cpu", NB, k)
    outs.append(attn(torch.randn(3, 64), torch.tensor([4, 39, 16]), meta))
assert (outs[0] - outs[1]).abs().max() < 1e-5, (outs[0] - outs[1]).abs().max()
print("ok")
'''


def test_triton_mla_decode_kernel_in_the_triton_interpreter():
    """The cuda platform's MLA decode kernel run by Triton's CPU interpreter (TRITON_INTERPRET=1) against
    the torch path's math; skipped where triton is not installed (the CI's CPU install has none)."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-c", _MLA_INTERPRETED], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


_MULTISTREAM = r'''
import logging, sys, torch, torch_npu, torchair
logging.basicConfig(level=logging.INFO)
from epplat.config import CacheConfig, EngineConfig, ModelConfig
from epplat.core.engine.core import EngineCore
from epplat.core.engine.model_runner import ModelInput
from epplat.core.model.attention import build_attn_metadata
from epplat.plugins import registry
cfg = EngineConfig(model=ModelConfig(model=sys.argv[1], dtype="bfloat16"), platform="ascend",
                   cache=CacheConfig(kv_cache_memory_bytes=64 << 20), additional_config={"torchair_graph_config": {
                       "enabled": True, "graph_batch_sizes": [4], "enable_multistream_moe": True,
                       "enable_multistream_mla": True}})
npu = registry().load("platform", "ascend")()
npu.configure(cfg)
runner = EngineCore(cfg, npu, npu.device(0)).runner                               # KV cache, graphs captured
mi = ModelInput([5, 9, 11], [3, 7, 2], [(4, 1, [0]), (8, 1, [1]), (3, 1, [2])])   # 3 decodes: padded to 4
graph = runner.forward(mi)
with torch.inference_mode():
    for layer in runner.model.layers:     # eager, one stream
        layer.shared_side_stream = layer.self_attn.query_side_stream = None
    eager = runner.model(torch.tensor(mi.token_ids), torch.tensor(mi.positions),
                         build_attn_metadata(mi.seqs, runner.block_size, runner.device, runner.pad_block))
assert torch.equal(graph, eager), (graph - eager).abs().max()
tags = {c[1] for c in torchair.calls if c[0] == "npu_stream_switch"}
assert tags == {"moe_secondary", "mla_secondary"}, torchair.calls
print("ok")
'''


def test_torchair_multistream_mla_and_moe_on_the_ascend_simulation(v3_dir):
    """torchair graph mode with enable_multistream_moe / enable_multistream_mla (SIMULATED torchair: the scopes
    run in order on one stream): the shared experts and MLA's query path enter their second streams, and the
    graph's output equals eager's."""
    import os
    import subprocess
    import sys
    from test_ascend_sim import SIM_ENV
    r = subprocess.run([sys.executable, "-c", _MULTISTREAM, str(v3_dir)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **SIM_ENV})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    assert "torchair multistream: 1 layers use stream moe_secondary, 2 layers use stream mla_secondary" in r.stderr
