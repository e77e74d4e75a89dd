"""Multi-process layouts on the cpu platform (gloo, real processes, real sockets): TP, TP + EP,
DP + EP, DP x TP with and without EP (Mixtral), DP=4 over two nodes of two ranks, both all2all
backends, several API servers, external load balancing, chunked prefill and preemption under
TP/DP/EP, least-loaded routing, idle CPU, shutdown and a dying rank. Greedy tokens, and the
logprobs of every generated token, equal transformers'."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time

import httpx
import openai
import pytest
import torch

from hf_oracle import hf_greedy
from server_utils import HealthPoller, Server, group_pids, kill_headless, rpc_port, start_headless

PROMPTS = [[5, 17, 99, 230, 7, 64, 300, 12], [400, 401, 402], list(range(100, 130)), [3, 9],
           [1500, 1200, 900], [77] * 6, [1024, 12, 512], [250, 260, 270, 280]]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def expected(qwen3_moe_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    return [tok.decode(r, skip_special_tokens=True)
            for r in hf_greedy(qwen3_moe_dir, PROMPTS, MAX_TOKENS, ignore_eos=True)]


def complete(url, model, prompts=PROMPTS, max_tokens=MAX_TOKENS):
    async def go():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(*(c.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0,
                                                         extra_body={"ignore_eos": True}) for p in prompts))
        return [r.choices[0].text for r in rs]
    return asyncio.run(go())


def complete_in_one_request(url, model, prompts, max_tokens) -> list[str]:
    """All prompts in one /v1/completions request: the API server hands them to the engines
    together, so they compete for the KV cache whatever the machine's load, and least-loaded
    routing deals them out evenly over the DP ranks (each pick sees the ones before it)."""
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    r = c.completions.create(model=model, prompt=prompts, max_tokens=max_tokens, temperature=0,
                             extra_body={"ignore_eos": True})
    return [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]


def metric(url, name) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    return sum(s.value for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text)
               for s in fam.samples if s.name == name)


def per_rank_requests(url) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name == "epplat:engine_requests_received":
                out[s.labels["dp_rank"]] = s.value
    return out


def metric_sum(text: str, name: str) -> float:
    """The sum of a series' samples (every label set) in a /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def cpu_seconds(pids) -> float:
    total = 0
    for p in pids:
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def _gpus_short(n):
    import torch
    return torch.cuda.is_available() and torch.cuda.device_count() < n


# A KV cache of 10 blocks of 8 tokens per engine and 16-token steps: the 30-token prompt is
# prefilled in chunks, and the 8 prompts of one request with 16 new tokens each (at least 12
# blocks for any 4 of them) do not fit an engine holding 4 or more, so requests are preempted.
TIGHT = ["--max-model-len", "64", "--block-size", "8", "--num-gpu-blocks-override", "10",
         "--max-num-batched-tokens", "16"]
LONG = 16


def expected_texts(model_dir, prompts, max_tokens):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok.decode(r, skip_special_tokens=True) for r in hf_greedy(model_dir, prompts, max_tokens, ignore_eos=True)]


def check_logprobs_of_every_token(url, model_dir, prompt, n=6, top=3):
    """Greedy with logprobs: every token's logprob and top alternatives equal transformers' on the
    whole sequence (not only the first token's)."""
    from transformers import AutoModelForCausalLM
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    r = c.completions.create(model=str(model_dir), prompt=prompt, max_tokens=n, temperature=0, logprobs=top,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    new = hf_greedy(model_dir, [prompt], n, ignore_eos=True)[0]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + new])).logits[0, len(prompt) - 1:-1].float(), -1)
    assert len(lp.token_logprobs) == n
    for i in range(n):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i, new[i]]), abs=2e-4), i
        assert sorted(lp.top_logprobs[i].values(), reverse=True)[:top] == pytest.approx(
            ref[i].topk(top).values.tolist(), abs=2e-4), i


@pytest.mark.slow
@pytest.mark.skipif(_gpus_short(4), reason="DP=2 x TP=2 on the cuda platform needs 4 GPUs")
def test_mixtral_dp2_x_tp2_without_ep_chunked_preempted_and_logprobs(mixtral_dir):
    want = expected_texts(mixtral_dir, PROMPTS, LONG)
    with Server(str(mixtral_dir), "--dtype", "float32", "-dp", "2", "-tp", "2", *TIGHT, timeout=180) as s:
        assert complete_in_one_request(s.url, str(mixtral_dir), PROMPTS, LONG) == want
        assert metric(s.url, "vllm:num_preemptions_total") > 0
        assert per_rank_requests(s.url) == {"0": 4, "1": 4}
        assert "EP rank" not in s.output()
        check_logprobs_of_every_token(s.url, mixtral_dir, PROMPTS[0])


def test_tp2_with_ep_chunked_and_preempted(qwen3_moe_dir):
    want = expected_texts(qwen3_moe_dir, PROMPTS, LONG)
    with Server(str(qwen3_moe_dir), "--dtype", "float32", "-tp", "2", "-ep", *TIGHT) as s:
        assert complete_in_one_request(s.url, str(qwen3_moe_dir), PROMPTS, LONG) == want
        assert metric(s.url, "vllm:num_preemptions_total") > 0
        log = s.output()
        assert "EP rank 0/2 holds experts 0-3 of 8" in log and "EP rank 1/2 holds experts 4-7 of 8" in log
        check_logprobs_of_every_token(s.url, qwen3_moe_dir, PROMPTS[2])


def test_tensor_parallel_2(qwen3_moe_dir, expected):
    with Server(str(qwen3_moe_dir), "--dtype", "float32", "-tp", "2", "--max-model-len", "256") as s:
        assert complete(s.url, str(qwen3_moe_dir)) == expected


def test_dp2_ep_naive_backend_two_api_servers(qwen3_moe_dir, expected):
    with Server(str(qwen3_moe_dir), "--dtype", "float32", "--data-parallel-size", "2", "--enable-expert-parallel",
                "--all2all-backend", "naive", "--api-server-count", "2", "--max-model-len", "256") as s:
        for _ in range(2):
            assert complete(s.url, str(qwen3_moe_dir)) == expected
        served = per_rank_requests(s.url)
        assert set(served) == {"0", "1"} and all(v > 0 for v in served.values()), served
        log = s.output()
        assert "EP rank 0/2 holds experts 0-3 of 8" in log and "EP rank 1/2 holds experts 4-7 of 8" in log
        m = re.search(r"resident expert bytes (\d+) of (\d+) \(1/2\)", log)
        assert m and 2 * int(m.group(1)) == int(m.group(2))
        # /health answers once either API server is up; the other may still be connecting
        deadline = time.time() + 20
        while time.time() < deadline and not all(f"API server {i} connected to 2 engine(s)" in s.output()
                                                 for i in (0, 1)):
            time.sleep(0.2)
        assert all(f"API server {i} connected to 2 engine(s)" in s.output() for i in (0, 1))
        _routes_on_fresh_loads(s.url, str(qwen3_moe_dir))
        # /metrics sums both API servers' request series, whichever answers (each scrape a new connection)
        for _ in range(6):
            text = httpx.get(s.url + "/metrics").text
            assert (metric_sum(text, "vllm:request_success_total"), metric_sum(text, "vllm:e2e_request_latency_seconds_count"),
                    metric_sum(text, "vllm:num_requests_running")) == (35, 35, 0), text


def _routes_on_fresh_loads(url: str, model: str) -> None:
    """Each API server routes on every engine's load, also one whose own requests there have ended: with one
    long stream on rank 0, short requests on new connections (some reach the other API server, whose first one
    goes to rank 0 too and comes back with rank 0's load then); once the stream has ended, the idle ranks tie
    and every request goes to rank 0 whichever API server takes it (an engine tells every API server when its
    load changes; before, the other one kept the load of its last output from rank 0 and sent them to rank 1)."""
    body = {"model": model, "prompt": PROMPTS[0], "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "max_tokens": 160, "stream": True},
                      timeout=120) as long:
        chunks = long.iter_lines()
        next(chunks)                                # it runs (on rank 0: both ranks were idle)
        for _ in range(8):                          # httpx.post: a new connection each, to either API server
            assert httpx.post(url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=60).status_code == 200
        assert any(line == "data: [DONE]" for line in chunks)
    before = per_rank_requests(url)
    for _ in range(10):
        assert httpx.post(url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=60).status_code == 200
    after = per_rank_requests(url)
    assert (after["0"] - before["0"], after["1"] - before["1"]) == (10, 0), (before, after)


@pytest.mark.skipif(_gpus_short(4), reason="DP=2 x TP=2 on the cuda platform needs 4 GPUs")
def test_dp2_tp2_ep_and_idle_cpu(qwen3_moe_dir, expected):
    with Server(str(qwen3_moe_dir), "--dtype", "float32", "-dp", "2", "-tp", "2", "-ep",
                "--max-model-len", "256", timeout=180) as s:
        assert complete(s.url, str(qwen3_moe_dir)) == expected
        served = per_rank_requests(s.url)
        assert all(v > 0 for v in served.values()) and len(served) == 2, served
        assert "EP rank 3/4 holds experts 6-7 of 8" in s.output()
        pids = group_pids(s.proc.pid)
        assert len(pids) >= 5          # launcher + 4 engine processes
        time.sleep(1.5)
        before = cpu_seconds(pids)
        time.sleep(3)
        assert cpu_seconds(pids) - before < 0.3   # all ranks sleep when idle: no busy spinning


@pytest.mark.slow
@pytest.mark.skipif(_gpus_short(4), reason="two nodes of two DP ranks on the cuda platform need 4 GPUs")
def test_dp4_on_two_nodes_of_two_ranks_without_ep_and_shutdown(qwen3_moe_dir, expected):
    port = rpc_port()
    common = ["--dtype", "float32", "--data-parallel-size", "4", "--data-parallel-size-local", "2",
              "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(port), "--max-model-len", "256"]
    # on a GPU host the two "nodes" must not share a GPU (NCCL refuses two ranks on one device)
    headless = start_headless(str(qwen3_moe_dir), "--data-parallel-start-rank", "2", *common,
                              env={"CUDA_VISIBLE_DEVICES": "2,3"})
    try:
        with Server(str(qwen3_moe_dir), *common, env={"CUDA_VISIBLE_DEVICES": "0,1"}, timeout=180) as primary:
            assert complete_in_one_request(primary.url, str(qwen3_moe_dir), PROMPTS, MAX_TOKENS) == expected
            assert per_rank_requests(primary.url) == {"0": 2, "1": 2, "2": 2, "3": 2}
            assert "EP rank" not in primary.output()
        # SIGTERM on the primary (Server.stop) stops the headless node's engines too
        headless.wait(30)
        deadline = time.time() + 10
        while time.time() < deadline and (group_pids(headless.pid) or group_pids(primary.proc.pid)):
            time.sleep(0.2)
        assert not group_pids(headless.pid) and not group_pids(primary.proc.pid)   # no orphans
    finally:
        kill_headless(headless)


def test_external_load_balancing(qwen3_moe_dir, expected):
    port = rpc_port()
    common = ["--dtype", "float32", "--data-parallel-size", "2", "--data-parallel-address", "127.0.0.1",
              "--data-parallel-rpc-port", str(port), "--enable-expert-parallel", "--max-model-len", "256"]
    servers = {}
    t = threading.Thread(target=lambda: servers.setdefault(1, Server(
        str(qwen3_moe_dir), *common, env={"EPPLAT_DP_RANK": "1", "CUDA_VISIBLE_DEVICES": "1"})))
    t.start()
    try:
        servers[0] = Server(str(qwen3_moe_dir), *common, "--data-parallel-rank", "0",
                            env={"CUDA_VISIBLE_DEVICES": "0"})
        t.join(120)
        half = len(PROMPTS) // 2
        assert complete(servers[0].url, str(qwen3_moe_dir), PROMPTS[:half]) == expected[:half]
        assert complete(servers[1].url, str(qwen3_moe_dir), PROMPTS[half:]) == expected[half:]
        assert per_rank_requests(servers[1].url) == {"1": half}
    finally:
        t.join(120)
        for s in servers.values():
            s.stop()


def test_least_loaded_routing_then_a_dying_rank_fails_health_and_in_flight_requests(qwen3_moe_dir, expected):
    with Server(str(qwen3_moe_dir), "--dtype", "float32", "-dp", "2", "-ep", "--max-model-len", "4096") as s:
        pid = int(re.search(r"engine \(DP rank 1, pid (\d+)\) ready", s.output()).group(1))
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = c.completions.create(model=str(qwen3_moe_dir), prompt="die", max_tokens=4000, stream=True,
                                      extra_body={"ignore_eos": True})
        got, t0, error, finished = 0, time.time(), None, False
        poller = HealthPoller(s.url)     # from before the kill, so the 503 window before the server exits is seen
        try:
            for chunk in stream:
                got += 1
                if got == 2:
                    # the long request holds one rank; least-loaded routing sends each of these to the other
                    busy = next(r for r, v in per_rank_requests(s.url).items() if v == 1)
                    for p, want in zip(PROMPTS[:3], expected[:3]):
                        assert complete(s.url, str(qwen3_moe_dir), [p]) == [want]
                    assert per_rank_requests(s.url) == {busy: 1, str(1 - int(busy)): 3}
                if got == 5:
                    poller.start()
                    os.kill(pid, signal.SIGKILL)
                if chunk.choices and chunk.choices[0].finish_reason:
                    finished = True
        except (openai.APIError, httpx.HTTPError) as e:
            error = e
        assert error is not None and not finished, f"stream ended normally after {got} chunks"
        assert time.time() - t0 < 60
        # a live API server answers 503; a refused connection first would mean the server died with the rank
        assert poller.first_change() == 503, poller.seen
