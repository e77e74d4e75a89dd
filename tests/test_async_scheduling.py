"""--async-scheduling: step N+1 scheduled and launched before step N's tokens are read on the host.

In-process engine cores, one with the flag and one without, give the same tokens (greedy =
transformers, seeded sampling, rules with logprobs, structured output, chunked prefill, preemption,
prefix caching, stop tokens and max_tokens with nothing sent after a request's end); the order of
the step's calls, measured with timestamps on the real calls, is overlapped with the flag and not
without it. One real server (DP=2 x TP=2 with EP: the DP wave and the tokens broadcast to the TP
workers) serves transformers' greedy tokens, stop strings and an abort mid-stream with the flag.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import torch

from epplat.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from epplat.core.engine.core import EngineCore
from epplat.core.engine.protocol import EngineRequest, SamplingParams, StructuredOutput
from epplat.core.host_copy import HostCopy
from epplat.platforms.cpu.platform import CpuPlatform
from hf_oracle import hf_greedy
from server_utils import Server

PROMPTS = [[5, 17, 99, 230, 7, 64, 300, 12, 45, 81, 9], [400, 401], list(range(100, 150)), [3]]
PREEMPTED = [[i + 1, 2 * i + 3, 50 + i, 7] for i in range(8)]
SHARED = list(range(200, 240))           # two full 16-token blocks in common
CACHED = [SHARED + [7, 8], SHARED + [9], SHARED + [1, 2, 3]]


@pytest.fixture(scope="module")
def ref(qwen3_moe_dir):
    """transformers' greedy tokens (14) for every prompt of this module, in one call."""
    got = hf_greedy(qwen3_moe_dir, PROMPTS + PREEMPTED + CACHED, 14, ignore_eos=True)
    return {"prompts": got[:4], "preempted": got[4:12], "cached": got[12:]}


def make_core(model_dir, async_scheduling, budget=2048, blocks=None, block_size=16, max_len=None):
    cfg = EngineConfig(ModelConfig(str(model_dir), dtype="float32", max_model_len=max_len),
                       scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=budget,
                                                 async_scheduling=async_scheduling),
                       cache=CacheConfig(block_size=block_size, num_gpu_blocks_override=blocks,
                                         kv_cache_memory_bytes=64 << 20))
    return EngineCore(cfg, CpuPlatform(), torch.device("cpu"))


def run(core, prompts, params, eos=()):
    """Every request's tokens and logprobs; fails if anything is sent for a request after its end."""
    out = {str(i): [] for i in range(len(prompts))}
    lps, ended = {k: [] for k in out}, {}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        core.add_request(EngineRequest(str(i), p, sp, eos_token_ids=list(eos)))
    steps = 0
    while core.has_work() or core.compiling:
        core.poll_grammars()
        if not core.has_work():
            time.sleep(0.01)                  # a grammar compiling
            continue
        for o in core.step():
            assert o.request_id not in ended, f"output after the end of {o.request_id}: {o}"
            out[o.request_id] += o.new_token_ids
            lps[o.request_id] += o.logprobs or []
            if o.finish_reason:
                ended[o.request_id] = o.finish_reason
        steps += 1
        assert steps < 10_000
    assert core.blocks.num_free == core.num_blocks and core.in_flight is None
    return [out[str(i)] for i in range(len(prompts))], [lps[str(i)] for i in range(len(prompts))], ended


def both(model_dir, prompts, params, **kw):
    """(without the flag, with it)"""
    return [run(make_core(model_dir, flag, **{k: v for k, v in kw.items() if k != "eos"}), prompts, params,
                kw.get("eos", ())) for flag in (False, True)]


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_greedy_chunked_and_preempted_tokens_are_transformers(qwen3_moe_dir, ref):
    lens = [3, 9, 12, 1]
    sync, asyn = both(qwen3_moe_dir, PROMPTS, [greedy(n) for n in lens], budget=7)
    assert asyn[0] == sync[0] == [r[:n] for r, n in zip(ref["prompts"], lens)]
    # 12 blocks of 4 tokens for 8 requests of up to 18 tokens: preemption, also of requests in flight
    core = make_core(qwen3_moe_dir, True, blocks=12, block_size=4, max_len=48)
    got = run(core, PREEMPTED, [greedy(14)] * 8)[0]
    assert core.scheduler.num_preemptions > 0
    assert got == ref["preempted"]


def test_sampling_rules_logprobs_and_stops_are_the_same(qwen3_moe_dir, ref):
    seeded = [SamplingParams(max_tokens=10, temperature=1.0, seed=s, ignore_eos=True) for s in range(4)]
    ruled = [SamplingParams(max_tokens=8, temperature=0.8, top_k=20, seed=7, presence_penalty=1.5,
                            repetition_penalty=1.2, min_tokens=3, logprobs=2, ignore_eos=True)] * 4
    for params in (seeded, ruled):
        sync, asyn = both(qwen3_moe_dir, PROMPTS, params)
        assert asyn[:2] == sync[:2]
    ref = ref["prompts"]
    stop, eos = ref[0][4], ref[2][6]       # one request's 5th token as a stop token id, another's 7th as EOS
    params = [SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop]), greedy(2),
              SamplingParams(max_tokens=12, temperature=0), greedy(1)]
    sync, asyn = both(qwen3_moe_dir, PROMPTS, params, eos=[eos])
    assert asyn == sync
    assert asyn[0][0] == ref[0][:ref[0].index(stop) + 1] and asyn[0][2] == ref[2][:ref[2].index(eos) + 1]
    assert asyn[2] == {"0": "stop", "1": "length", "2": "stop", "3": "length"}


def test_structured_output_and_prefix_caching_are_the_same(qwen3_moe_dir, ref):
    regex = StructuredOutput("regex", "(yes|no|[0-9]{3}) [a-z]{2,6}")
    params = [SamplingParams(max_tokens=12, temperature=0, structured_output=regex), greedy(6)] * 2
    sync, asyn = both(qwen3_moe_dir, PROMPTS, params)
    assert asyn[0] == sync[0] and asyn[0][1] == ref["prompts"][1][:6]
    core = make_core(qwen3_moe_dir, True)
    first = run(core, CACHED[:1], [greedy(6)])[0]
    later = run(core, CACHED[1:], [greedy(6)] * 2)[0]
    assert core.blocks.hits >= 64
    assert first + later == [r[:6] for r in ref["cached"]]


def _timed_calls(core) -> list[tuple[str, int]]:
    """Wraps the real scheduler call and the host read of a step's tokens to log their order (by time)."""
    log = []
    schedule, read = core.scheduler.schedule, HostCopy.tolist

    def timed_schedule(*a, **kw):
        log.append((time.perf_counter_ns(), "schedule"))
        return schedule(*a, **kw)

    def timed_read(self):
        log.append((time.perf_counter_ns(), "read"))
        return read(self)

    core.scheduler.schedule = timed_schedule
    return log, timed_read


def test_step_n_plus_1_is_scheduled_and_launched_before_step_n_is_read(qwen3_moe_dir, monkeypatch):
    orders, fills = {}, {}
    for flag in (False, True):
        core = make_core(qwen3_moe_dir, flag)
        log, timed_read = _timed_calls(core)
        monkeypatch.setattr(HostCopy, "tolist", timed_read)
        forward = core.runner.forward
        filled = []
        core.runner.forward = lambda mi: (filled.append(len(mi.fill_rows or ())), forward(mi))[1]
        run(core, PROMPTS, [greedy(6)] * 4)
        orders[flag] = [what for _, what in sorted(log)]
        fills[flag] = filled
    # without the flag each step's tokens are read before the next step is scheduled
    assert orders[False][:6] == ["schedule", "read"] * 3 and fills[False] == [0] * 6
    # with it, step 2 is scheduled (and launched, its inputs taking step 1's tokens on the device)
    # before step 1's tokens are read, and so on
    assert orders[True][:6] == ["schedule", "schedule", "read", "schedule", "read", "schedule"]
    assert fills[True][1:6] == [4] * 5


def test_refused_combinations_fail_in_one_line(qwen3_moe_dir, capsys):
    from epplat.cli import main
    for extra, message in ((["-pp", "2"], "--async-scheduling is not supported with --pipeline-parallel-size > 1"),
                           (["--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'],
                            "--async-scheduling is not supported with --kv-transfer-config"),
                           (["-dp", "2", "-ep", "--enable-elastic-ep"],
                            "--async-scheduling is not supported with --enable-elastic-ep")):
        assert main(["serve", str(qwen3_moe_dir), "--async-scheduling", *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"epplat serve: error: {message}"), err


@pytest.fixture(scope="module")
def server(qwen3_moe_dir):
    with Server(str(qwen3_moe_dir), "--dtype", "float32", "-dp", "2", "-tp", "2", "-ep", "--async-scheduling",
                "--max-model-len", "512", timeout=180) as s:
        yield s


def test_dp2_tp2_ep_server_tokens_stop_strings_and_abort(server, qwen3_moe_dir, ref):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    prompts = PROMPTS + PREEMPTED[:2]
    want = [tok.decode(r[:10], skip_special_tokens=True) for r in ref["prompts"] + ref["preempted"][:2]]
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    r = c.completions.create(model=str(qwen3_moe_dir), prompt=prompts, max_tokens=10, temperature=0,
                             extra_body={"ignore_eos": True})
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == want
    stop = want[2][len(want[2]) // 2:][:3]
    r = c.completions.create(model=str(qwen3_moe_dir), prompt=prompts[2], max_tokens=10, temperature=0,
                             stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == want[2][:want[2].index(stop)] and r.choices[0].finish_reason == "stop"
    stream = c.completions.create(model=str(qwen3_moe_dir), prompt=prompts[0], max_tokens=400, temperature=0,
                                  stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()                          # abort mid-stream; the engines go on serving
    r = c.completions.create(model=str(qwen3_moe_dir), prompt=prompts[1], max_tokens=10, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == want[1]
    deadline = time.time() + 30
    while True:                             # the aborted request leaves the engines
        running = [float(line.rsplit(" ", 1)[1]) for line in httpx.get(server.url + "/metrics").text.splitlines()
                   if line.startswith("vllm:num_requests_running{")]
        if running and not any(running):
            break
        assert time.time() < deadline, f"requests still running: {running}"
        time.sleep(0.2)
