"""Pipeline parallelism on the cpu platform (gloo send/recv between real processes): an uneven split
(5 layers over 2 stages) under chunked prefill and preemption, PP=2 with DP=2 + EP and EPLB rebalancing
each stage's experts (PP=2 x TP=2 on the mp backend with the uneven split, and placed by Ray in test_ray_backend.py). Greedy tokens (and every token's logprobs) equal transformers'
through HTTP and the openai client. The engine core keeps several steps in flight (of different
requests) and still gives transformers' tokens; bad layer splits are one line."""

from __future__ import annotations

import json
import re

import openai
import pytest
import torch

from epplat.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, SchedulerConfig
from epplat.core.distributed.pipeline import layer_partition
from epplat.core.engine.core import EngineCore
from epplat.core.engine.protocol import EngineRequest, SamplingParams
from epplat.platforms.cpu.platform import CpuPlatform
from hf_oracle import hf_greedy
from server_utils import Server
from test_parallel import PROMPTS, TIGHT, check_logprobs_of_every_token, complete, complete_in_one_request, \
    expected_texts, metric


@pytest.fixture(scope="module")
def five_layer_dir(tmp_path_factory):
    from epplat.tools.make_model import make_model
    return make_model("qwen3_moe", tmp_path_factory.mktemp("five_layers"), layers=5, hidden=64, experts=8, top_k=2,
                      heads=4, kv_heads=2, head_dim=32, moe_intermediate=64, vocab_size=2048, seed=3)


def test_layer_partition_is_vllms(monkeypatch):
    monkeypatch.delenv("EPPLAT_PP_LAYER_PARTITION", raising=False)
    monkeypatch.delenv("VLLM_PP_LAYER_PARTITION", raising=False)
    # vLLM: the layers left over go to the stages before the last, from the second-to-last backwards
    assert layer_partition(5, 2) == [3, 2]
    assert layer_partition(4, 3) == [1, 2, 1]
    assert layer_partition(5, 3) == [2, 2, 1]
    assert layer_partition(8, 4) == [2, 2, 2, 2]
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "1,4")
    assert layer_partition(5, 2) == [1, 4]
    monkeypatch.setenv("EPPLAT_PP_LAYER_PARTITION", "4,1")       # epplat's name first
    assert layer_partition(5, 2) == [4, 1]


@pytest.mark.parametrize("env, flags, message", [
    ({}, ["-pp", "6"], "5 layers do not split over --pipeline-parallel-size 6"),
    ({"EPPLAT_PP_LAYER_PARTITION": "2,2"}, ["-pp", "2"], "EPPLAT_PP_LAYER_PARTITION='2,2' must give 2 stages"),
    ({"EPPLAT_PP_LAYER_PARTITION": "2,x"}, ["-pp", "2"], "is not a comma-separated list"),
    ({}, ["-pp", "2", "--enable-elastic-ep", "-ep"], "--pipeline-parallel-size"),
    ({}, ["-pp", "2", "--kv-transfer-config", '{"kv_connector": "DecodeBenchConnector", "kv_role": "kv_both"}'],
     "--kv-transfer-config: DecodeBenchConnector does not run with --pipeline-parallel-size > 1"),
])
def test_bad_splits_are_one_line(five_layer_dir, monkeypatch, env, flags, message):
    from epplat.cli import build_parser
    from epplat.serve import engine_config_from_args
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=re.escape(message)):
        engine_config_from_args(build_parser().parse_args(["serve", str(five_layer_dir), *flags]))


def test_steps_in_flight_give_transformers_tokens(qwen3_moe_dir):
    """Two steps in flight at once, as the pipelined driver keeps them: the second is scheduled while the
    first is not completed and takes none of its requests (nor preempts them); tokens stay transformers'."""
    cfg = EngineConfig(ModelConfig(str(qwen3_moe_dir), dtype="float32", max_model_len=64),
                       scheduler=SchedulerConfig(max_num_batched_tokens=16),
                       cache=CacheConfig(block_size=4, num_gpu_blocks_override=16))
    core = EngineCore(cfg, CpuPlatform(), torch.device("cpu"))
    prompts = [[i + 1, 2 * i + 3, 50 + i, 7, 9] for i in range(6)]
    for i, p in enumerate(prompts):
        core.add_request(EngineRequest(str(i), p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)))
    out = {str(i): [] for i in range(len(prompts))}
    in_flight, overlapped = [], 0
    while core.has_work() or in_flight:
        while len(in_flight) < 2:
            batch = core.schedule(-(-(len(core.scheduler.running) + len(core.scheduler.waiting)) // 2))
            if not batch:
                break
            taken = {r.request_id for b, _, _, _ in in_flight for r, _ in b}
            assert not taken & {r.request_id for r, _ in batch}
            in_flight.append(core.launch(batch))
        overlapped += len(in_flight) == 2
        for o in core.complete(in_flight.pop(0)):
            out[o.request_id] += o.new_token_ids
    assert overlapped > 5 and core.scheduler.num_preemptions > 0
    assert [out[str(i)] for i in range(len(prompts))] == hf_greedy(qwen3_moe_dir, prompts, 12, ignore_eos=True)
    assert core.blocks.num_free == core.num_blocks


@pytest.mark.slow
def test_uneven_split_over_two_stages_of_tp2(five_layer_dir):
    """5 layers over 2 stages (3 + 2) of 2 TP ranks each (mp backend: PP=2 x TP=2, 4 processes), chunked prefill
    and preemption in a tiny KV cache, every token's logprobs."""
    model = str(five_layer_dir)
    long_prompts = [[(i * 31 + j * 7) % 2000 + 3 for j in range(20)] for i in range(8)]
    with Server(model, "--dtype", "float32", "-pp", "2", "-tp", "2", *TIGHT, timeout=300) as s:
        log = s.output()
        assert "Pipeline stage 0/2 holds layers 0-2 of 5" in log and "Pipeline stage 1/2 holds layers 3-4 of 5" in log
        for rank, pp, tp in ((1, 0, 1), (2, 1, 0), (3, 1, 1)):
            assert re.search(rf"rank {rank}/4: DP rank 0, PP rank {pp}, TP rank {tp}", log), log[-3000:]
        assert complete(s.url, model) == expected_texts(model, PROMPTS, 8)
        assert complete_in_one_request(s.url, model, long_prompts, 16) == expected_texts(model, long_prompts, 16)
        assert metric(s.url, "vllm:num_preemptions_total") > 0
        check_logprobs_of_every_token(s.url, five_layer_dir, PROMPTS[0])
        _check_prompt_logprobs(s.url, model, long_prompts[0] + long_prompts[1][:10])


def _check_prompt_logprobs(url, model, prompt):
    """prompt_logprobs of a prompt prefilled in chunks: the last stage sends the driver those rows too."""
    from transformers import AutoModelForCausalLM
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    r = c.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 1})
    plp = r.choices[0].prompt_logprobs
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)(torch.tensor([prompt])).logits[0]
    ref = ref.double().log_softmax(-1)
    assert len(plp) == len(prompt) and plp[0] is None
    for p, entry in enumerate(plp[1:]):
        assert entry[str(prompt[p + 1])]["logprob"] == pytest.approx(float(ref[p, prompt[p + 1]]), abs=1e-3), p


@pytest.mark.slow
def test_pp2_with_dp2_ep_and_eplb(skewed_dir):
    """Each stage's MoE layers are expert-parallel over the DP ranks (EP group = the stage's ranks) and EPLB
    rebalances each stage on its own; tokens stay transformers'."""
    model = str(skewed_dir)
    eplb = {"window_size": 4, "step_interval": 4}
    with Server(model, "--dtype", "float32", "-pp", "2", "-dp", "2", "-ep", "--max-model-len", "256",
                "--enable-eplb", "--eplb-config", json.dumps(eplb), timeout=300) as s:
        log = s.output()
        assert re.search(r"rank 3/4: DP rank 1, PP rank 1, TP rank 0, EP rank 1/2", log)
        want = expected_texts(model, PROMPTS, 8)
        assert complete(s.url, model) == want
        assert complete_in_one_request(s.url, model, PROMPTS, 8) == want
        log = s.output()
        for stage in ("PP0", "PP1"):
            assert re.search(rf"EngineCore_DP0_{stage} [^\]]*\] EPLB rebalance \d+", log), log[-3000:]
