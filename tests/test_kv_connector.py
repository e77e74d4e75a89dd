"""The KV connector contract through the engine and the API: --kv-transfer-config parsing (vLLM's
keys, one error line), DecodeBenchConnector filling a new request's prompt KV so that only its last
token is computed, kv_transfer_params on requests and responses (null when nothing), X-Request-Id
honoured and echoed, malformed kv_transfer_params a 400."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

import cli_cases
from epplat.config import CacheConfig, ConfigError, EngineConfig, KVTransferConfig, ModelConfig, SchedulerConfig
from epplat.core.engine.core import EngineCore
from epplat.core.engine.protocol import EngineRequest, SamplingParams
from epplat.platforms.cpu.platform import CpuPlatform
from server_utils import Server
from test_server import metric

BENCH = '{"kv_connector":"DecodeBenchConnector","kv_role":"kv_both","kv_connector_extra_config":{"fill_mean":0.015}}'


def bench_core(model_dir, extra):
    kv = KVTransferConfig.parse(json.dumps({"kv_connector": "DecodeBenchConnector", "kv_role": "kv_both",
                                            "kv_connector_extra_config": extra}))
    cfg = EngineConfig(ModelConfig(str(model_dir), dtype="float32"), scheduler=SchedulerConfig(),
                       cache=CacheConfig(block_size=16, kv_cache_memory_bytes=64 << 20), kv_transfer=kv)
    return EngineCore(cfg, CpuPlatform(), torch.device("cpu"))


def test_vllm_guide_configs_parse_and_bad_ones_are_one_line():
    nixl = KVTransferConfig.parse('{"kv_connector":"NixlConnector","kv_role":"kv_both",'
                                  '"kv_connector_extra_config":{"backends":["UCX"]}}')
    assert nixl.kv_port == 14579 and nixl.kv_buffer_device == "cuda" and nixl.engine_id
    ascend = KVTransferConfig.parse(json.dumps({
        "kv_connector": "LLMDataDistCMgrConnector", "kv_buffer_device": "npu", "kv_role": "kv_consumer",
        "kv_parallel_size": 1, "kv_port": "20001", "engine_id": "0", "kv_rank": 0,
        "kv_connector_module_path": "vllm_ascend.distributed.llmdatadist_c_mgr_connector",
        "kv_connector_extra_config": {"prefill": {"dp_size": 2, "tp_size": 8}, "decode": {"dp_size": 4, "tp_size": 4}}}))
    assert ascend.kv_port == 20001 and ascend.is_consumer and not ascend.is_producer
    for text, needle in [('{"kv_connector":"X","kv_role":"kv_both","kv_prot":1}', "unknown key 'kv_prot'"),
                         ('{"kv_connector":"X","kv_role":"both"}', "kv_role must be one of"),
                         ('{"kv_role":"kv_both"}', "kv_connector is required"),
                         ('{"kv_connector":"X","kv_role":"kv_both","kv_port":70000}', "kv_port"),
                         ('{"kv_connector":"X"', "not valid JSON")]:
        with pytest.raises(ConfigError, match=needle) as e:
            KVTransferConfig.parse(text)
        assert "\n" not in str(e.value)


def test_decode_bench_fills_the_prompt_and_computes_only_its_last_token(qwen3_moe_dir):
    core = bench_core(qwen3_moe_dir, {"fill_mean": 0.5, "fill_std": 0.0})
    prompt = list(range(100, 140))          # 40 tokens: 39 filled, 1 computed
    core.add_request(EngineRequest("a", prompt, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)))
    req = core.scheduler.requests["a"]
    batch = core.schedule()
    assert [(r.request_id, n) for r, n in batch] == [("a", 1)] and req.num_computed == 39
    out = core.run(batch)
    assert len(out) == 1 and len(out[0].new_token_ids) == 1
    k, v = core.runner.model.layers[1].self_attn.kv_cache
    slots = [(req.block_table[p // 16], p % 16) for p in range(40)]
    for cache in (k, v):
        filled = torch.stack([cache[b, o] for b, o in slots[:39]])
        assert torch.all(filled == 0.5)
        assert not torch.all(cache[slots[39]] == 0.5)        # the last prompt token was computed
    tokens = out[0].new_token_ids
    while core.has_work():
        tokens += [t for o in core.step() for t in o.new_token_ids]
    assert len(tokens) == 5 and core.blocks.num_free == core.num_blocks


def test_decode_bench_draws_from_the_normal_it_is_given(qwen3_moe_dir):
    core = bench_core(qwen3_moe_dir, {"fill_mean": 0.0, "fill_std": 2.0})
    core.add_request(EngineRequest("a", list(range(1, 1001)), SamplingParams(max_tokens=1, ignore_eos=True)))
    req = core.scheduler.requests["a"]
    batch = core.schedule()
    table = list(req.block_table)           # the request finishes in this step and frees them
    core.run(batch)
    k = core.runner.model.layers[0].self_attn.kv_cache[0]
    vals = torch.cat([k[table[p // 16], p % 16].flatten() for p in range(999)])
    assert abs(vals.mean().item()) < 0.05 and abs(vals.std().item() - 2.0) < 0.05
    with pytest.raises(ConfigError, match="fill_std"):
        bench_core(qwen3_moe_dir, {"fill_std": -1})


def test_bad_kv_transfer_config_flags_are_one_line(qwen3_moe_dir):
    cases = [('{"kv_connector":"NoSuch","kv_role":"kv_both"}', "NoSuch"),
             ('{"kv_connector":"DecodeBenchConnector","kv_role":"kv_both","kv_ports":1}', "kv_ports"),
             ('{"kv_connector":"DecodeBenchConnector","kv_role":"kv_both",'
              '"kv_connector_module_path":"no.such.module"}', "no.such.module")]
    results = cli_cases.run([["serve", str(qwen3_moe_dir), "--kv-transfer-config", c] for c, _ in cases])
    for (config, needle), r in zip(cases, results):
        cli_cases.assert_one_error_line(r, needle, config)


def test_api_kv_transfer_params_and_request_ids(qwen3_moe_dir):
    with Server(str(qwen3_moe_dir), "--dtype", "float32", "--max-model-len", "512", "--kv-transfer-config", BENCH) as s:
        url = s.url + "/v1"
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        r = client.completions.with_raw_response.create(model=str(qwen3_moe_dir), prompt=list(range(5, 45)),
                                                         max_tokens=3, extra_headers={"X-Request-Id": "pd-17"},
                                                         extra_body={"kv_transfer_params": {"do_remote_decode": True}})
        body = r.parse()
        assert r.headers["X-Request-Id"] == "pd-17" and body.id == "cmpl-pd-17"
        assert "kv_transfer_params" in body.model_extra and body.model_extra["kv_transfer_params"] is None
        chat = httpx.post(url + "/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 2}, timeout=60)
        assert chat.status_code == 200 and chat.json()["kv_transfer_params"] is None
        assert chat.json()["id"] == "chatcmpl-" + chat.headers["X-Request-Id"]
        for bad in ([1, 2], {"do_remote_prefill": "yes"}, {"remote_block_ids": ["a"]}, {"remote_port": "x"}):
            e = httpx.post(url + "/completions", json={"prompt": "a", "max_tokens": 2, "kv_transfer_params": bad})
            assert e.status_code == 400 and e.json()["error"]["param"] == "kv_transfer_params", (bad, e.text)
        # prompt tokens the engine computed: 1 of the 40 (DecodeBench filled the rest), and the chat prompt's last
        assert metric(s.url, "epplat:prompt_tokens_computed_total") == 2


def test_do_remote_prefill_without_a_connector_is_a_400(qwen3_moe_dir):
    with Server(str(qwen3_moe_dir), "--max-model-len", "512") as s:
        e = httpx.post(s.url + "/v1/completions", json={
        "prompt": "This prompt is ignored during decode", "max_tokens": 2,
            "kv_transfer_params": {"do_remote_prefill": True, "remote_block_ids": [1], "remote_engine_id": "x"}})
    assert e.status_code == 400 and "--kv-transfer-config" in e.json()["error"]["message"]


def test_which_remote_ranks_a_decode_rank_reads():
    """vLLM's heterogeneous TP between P and D, and pipeline stages on either side: every KV head of every
    layer is read from exactly one remote rank, and a remote rank whose part another replica serves has no
    reader (the decode side releases it)."""
    from epplat.connectors.tp_ranks import head_range, readers, sources

    def stages(layers, pp):
        per = [layers // pp + (s < layers % pp) for s in range(pp)]
        return [(sum(per[:s]), sum(per[:s + 1])) for s in range(pp)]

    def check(total, p_tp, d_tp, layers=1, p_pp=1, d_pp=1):
        remote = [(head_range(total, p_tp, r), st) for st in stages(layers, p_pp) for r in range(p_tp)]
        local = [(head_range(total, d_tp, d), st) for st in stages(layers, d_pp) for d in range(d_tp)]
        for i, (heads, lrange) in enumerate(local):
            got = sorted((layer, h) for r in sources((heads, lrange), remote, i)
                         for h in range(*remote[r][0]) for layer in range(*remote[r][1])
                         if heads[0] <= h < heads[1] and lrange[0] <= layer < lrange[1])
            assert got == [(layer, h) for layer in range(*lrange) for h in range(*heads)], (total, p_tp, d_tp, i)
        return readers(local, remote)

    assert check(4, 1, 2) == [2]                # D splits finer: both decode ranks read the one prefill rank
    assert check(4, 2, 1) == [1, 1]             # P splits finer: the decode rank reads both
    assert check(4, 4, 2) == [1, 1, 1, 1]
    assert check(2, 4, 1) == [1, 0, 1, 0]       # P replicates heads: one replica of each is read
    assert check(2, 4, 4) == [1, 1, 1, 1]
    assert check(1, 2, 2) == [1, 1]
    # pipeline stages: each decode rank reads its layers from the stages that hold them
    assert check(2, 1, 2, layers=2, d_pp=2) == [4]                  # one prefill rank, PP=2 x TP=2 decode
    assert check(2, 2, 1, layers=2, p_pp=2) == [1, 1, 1, 1]         # PP=2 x TP=2 prefill, one decode rank
    assert check(2, 1, 1, layers=5, p_pp=2, d_pp=3) == [2, 2]       # uneven splits: layers 0-2, 3-4 vs 0-1, 2-3, 4
    assert check(2, 2, 2, layers=3, p_pp=3, d_pp=2) == [1] * 6     # each prefill rank: one stage and TP rank reads it
