"""Prefill/decode disaggregation through the ascend plugin's LLMDataDistCMgrConnector on SIMULATED
Ascend libraries (tests/simulations: torch_npu's "npu" tensors live on the CPU; llm_datadist links the
"devices" of the ranktable and pull_blocks moves the KV bytes for real between the server processes,
over loopback). The ranktable comes from `epplat ranktable` (fake npu-smi / hccn_tool); the
--kv-transfer-config is vllm-ascend's, pasted with its module path. A prefill server (TP=2 with EP)
and a decode server (TP=2) as separate `epplat serve --platform ascend` processes, every TP rank a
ranktable device of its own and decode TP rank r pulling from prefill TP rank r: greedy tokens of
PD-split requests equal transformers', the decode side computes only each prompt's last token, the
prefill side frees every held block; a prefill server that died is recomputed on the decode side.
Bad configurations are one error line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import simulations
from hf_oracle import hf_greedy
from server_utils import Server, free_port
from simulations.ascend_tools import env_with, install
from test_pd_nixl import PROMPTS, decode_call, prefill_blocks_free, prefill_call
from test_server import metric

MODULE = "vllm_ascend.distributed.llmdatadist_c_mgr_connector"


def kv(role, **extra):
    return json.dumps({"kv_connector": "LLMDataDistCMgrConnector", "kv_buffer_device": "npu", "kv_role": role,
                       "kv_parallel_size": 1, "kv_port": "20001", "engine_id": "0", "kv_rank": 0,
                       "kv_connector_module_path": MODULE,
                       "kv_connector_extra_config": {"prefill": {"dp_size": 1, "tp_size": 2},
                                                     "decode": {"dp_size": 1, "tp_size": 2}, **extra}})


@pytest.fixture(scope="module")
def ascend_pd(qwen3_moe_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llmdd")
    tools = env_with(install(tmp / "bin", kind="910b", npus=4, ip_prefix="29.7.91.", ip_start=60))
    table = tmp / "ranktable.json"
    r = subprocess.run([sys.executable, "-m", "epplat.cli", "ranktable", "--ips", "127.0.0.1", "--npus-per-node", "4",
                        "--prefill-device-cnt", "2", "--decode-device-cnt", "2", "--master-port", str(free_port()),
                        "--output", str(table)], capture_output=True, text=True, env=tools, timeout=60)
    assert r.returncode == 0, r.stderr
    (tmp / "fabric").mkdir()
    env = {**simulations.env("npu", "datadist"), "PATH": tools["PATH"], "DISAGGREGATED_PREFILL_RANK_TABLE_PATH":
           str(table), "VLLM_HOST_IP": "127.0.0.1", "SIM_LLM_DATADIST_FABRIC": str(tmp / "fabric"),
           "HCCL_IF_IP": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "VLLM_NIXL_ABORT_REQUEST_TIMEOUT": "30"}
    common = ("--platform", "ascend", "--dtype", "float32", "--max-model-len", "256")
    with Server(str(qwen3_moe_dir), *common, "-tp", "2", "-ep", "--kv-transfer-config", kv("kv_producer"),
                env={**env, "ASCEND_RT_VISIBLE_DEVICES": "0,1", "VLLM_ASCEND_LLMDD_RPC_PORT": str(free_port(2))},
                timeout=240) as prefill, \
            Server(str(qwen3_moe_dir), *common, "-tp", "2", "--kv-transfer-config", kv("kv_consumer"),
                   env={**env, "ASCEND_RT_VISIBLE_DEVICES": "2,3", "VLLM_ASCEND_LLMDD_RPC_PORT": str(free_port(2))},
                   timeout=240) as decode:
        yield prefill, decode, env


def test_llmdatadist_pd_split_on_simulated_ascend_equals_transformers(ascend_pd, qwen3_moe_dir):
    from transformers import AutoTokenizer
    prefill, decode, _ = ascend_pd
    tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    want = [tok.decode(w, skip_special_tokens=True) for w in hf_greedy(qwen3_moe_dir, PROMPTS, 8, ignore_eos=True)]
    computed0 = metric(decode.url, "epplat:prompt_tokens_computed_total")
    got = []
    for ids, stream in [(PROMPTS[0], False), (PROMPTS[1], True), ([9, *PROMPTS[1]], False)]:
        params = prefill_call(prefill, ids)
        assert params["remote_tp_size"] == "2" and params["remote_host"] == "127.0.0.1", params
        got.append(decode_call(decode, params, 8, stream))
    want.append(tok.decode(hf_greedy(qwen3_moe_dir, [[9, *PROMPTS[1]]], 8, ignore_eos=True)[0],
                           skip_special_tokens=True))
    assert got == want, (got, want)
    # the decode side computed only each prompt's last token; it pulled the rest
    assert metric(decode.url, "epplat:prompt_tokens_computed_total") - computed0 == 3, decode.output()[-3000:]
    assert prefill_blocks_free(prefill, 20), "the prefill side kept blocks the decoder read"
    plog, dlog = prefill.output(), decode.output()
    assert f"'{MODULE}' is vLLM's module; using epplat's registered connector 'LLMDataDistCMgrConnector'" in plog
    # each TP rank of either side is its own ranktable device (prefill clusters 1 and 2, decode 3 and 4)
    for log, rank, cluster, device in [(plog, 0, 1, 0), (plog, 1, 2, 1), (dlog, 0, 3, 2), (dlog, 1, 4, 3)]:
        assert f"TP rank {rank} is cluster {cluster} (device {device}, 29.7.91.{60 + device})" in log
    assert "computing its prompt" not in dlog
    assert metric(decode.url, "vllm:kv_cache_usage_perc") == 0.0
    # a prefill server that died after answering: the decode side computes the prompt itself, same tokens
    fresh = [(3 * i + 2) % 1900 + 30 for i in range(40)]
    orphan = prefill_call(prefill, fresh)
    prefill.stop()
    computed0 = metric(decode.url, "epplat:prompt_tokens_computed_total")
    assert decode_call(decode, orphan, 6) == tok.decode(hf_greedy(qwen3_moe_dir, [fresh], 6, ignore_eos=True)[0],
                                                        skip_special_tokens=True)
    assert metric(decode.url, "epplat:prompt_tokens_computed_total") - computed0 == 40
    assert "computing its prompt here instead" in decode.output()
    assert metric(decode.url, "vllm:kv_cache_usage_perc") == 0.0


def test_llmdatadist_bad_configs_are_one_line(ascend_pd, qwen3_moe_dir, monkeypatch):
    from epplat.config import ConfigError, EngineConfig, KVTransferConfig, ModelConfig, ParallelConfig
    from epplat.platforms.ascend.llmdatadist_connector import LLMDataDistCMgrConnector
    _, _, base = ascend_pd
    r = subprocess.run([sys.executable, "-m", "epplat.cli", "serve", str(qwen3_moe_dir), "--platform", "ascend",
                        "--kv-transfer-config", kv("kv_both")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **base})
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert r.returncode != 0 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "LLMDataDistCMgrConnector: kv_role must be kv_producer or kv_consumer, not kv_both" in errors[0]
    # the other checks, in this process (the same ConfigError lines the CLI prints)
    monkeypatch.setenv("DISAGGREGATED_PREFILL_RANK_TABLE_PATH", base["DISAGGREGATED_PREFILL_RANK_TABLE_PATH"])
    for role, extra, env, needle in [
            ("kv_consumer", {"decode": {"dp_size": 2, "tp_size": 1}}, None,
             "kv_connector_extra_config.decode.dp_size is 2 but this decode server has 1"),
            ("kv_consumer", {"decode": {"dp": 1}}, None,
             "kv_connector_extra_config.decode must be an object of dp_size, tp_size"),
            ("kv_consumer", {"prefill": {"dp_size": 1, "tp_size": 2}, "decode": {"dp_size": 1, "tp_size": 1}}, None,
             "prefill tp_size 2 and decode tp_size 1 differ; pull_blocks moves whole blocks"),
            ("kv_producer", {"prefill": {"dp_size": 1, "tp_size": 1}}, "/nonexistent/rt.json",
             "DISAGGREGATED_PREFILL_RANK_TABLE_PATH: cannot read /nonexistent/rt.json"),
            ("kv_producer", {"prefill": {"dp_size": 1, "tp_size": 1}}, "",
             "set DISAGGREGATED_PREFILL_RANK_TABLE_PATH to the ranktable `epplat ranktable` wrote")]:
        cfg = json.loads(kv(role))
        cfg["kv_connector_extra_config"].update(extra)
        if env is not None:
            monkeypatch.setenv("DISAGGREGATED_PREFILL_RANK_TABLE_PATH", env)
        eng = EngineConfig(ModelConfig(str(qwen3_moe_dir)), parallel=ParallelConfig(internal_secret="x"),
                           kv_transfer=KVTransferConfig.parse(json.dumps(cfg)))
        with pytest.raises(ConfigError, match=re.escape(needle)):
            LLMDataDistCMgrConnector.check_config(eng)
