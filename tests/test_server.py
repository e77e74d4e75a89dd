"""The real server as a subprocess, queried with the real openai client.

Greedy completions equal transformers' generate for the same checkpoint (single and
16 concurrent requests, Qwen3-MoE and Mixtral); streaming, chat, stop strings, n>1,
logprobs, bad requests, client disconnects and preemption under a tiny KV cache.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from hf_oracle import hf_greedy
from server_utils import Server

PROMPTS = ["The quick brown fox", "def add(a, b):", "Once upon a time there was", "1, 2, 3, 4,",
           "Experts are routed", "hello world", "A mixture of experts", "import torch"]


@pytest.fixture(scope="module")
def qwen_server(qwen3_moe_dir):
    with Server(str(qwen3_moe_dir), "--dtype", "float32", "--max-model-len", "4096",
                "--served-model-name", "qwen-test", "extra-alias", env={"EPPLAT_LOG_STATS_INTERVAL": "1"}) as s:
        yield s


@pytest.fixture(scope="module")
def client(qwen_server):
    return openai.OpenAI(base_url=qwen_server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def aclient(qwen_server):
    return qwen_server.url


def token_ids(tokenizer_dir, texts):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tok, [tok.encode(t, add_special_tokens=False) for t in texts]


def test_models_health_version(client, qwen_server):
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == ["qwen-test", "extra-alias"]
    assert httpx.get(qwen_server.url + "/health").status_code == 200
    assert "version" in httpx.get(qwen_server.url + "/version").json()


def test_single_greedy_completion_matches_transformers(client, qwen3_moe_dir):
    tok, ids = token_ids(qwen3_moe_dir, PROMPTS[:1])
    ref = hf_greedy(qwen3_moe_dir, ids, 16)[0]
    r = client.completions.create(model="qwen-test", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert r.choices[0].text == tok.decode(ref, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids[0]) and r.usage.completion_tokens == len(ref)


def test_token_id_prompts_and_lists(client, qwen3_moe_dir):
    tok, ids = token_ids(qwen3_moe_dir, PROMPTS[:3])
    ref = hf_greedy(qwen3_moe_dir, ids, 8)
    r = client.completions.create(model="qwen-test", prompt=ids, max_tokens=8, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [
        tok.decode(x, skip_special_tokens=True) for x in ref]
    r = client.completions.create(model="qwen-test", prompt=PROMPTS[:3], max_tokens=8, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [
        tok.decode(x, skip_special_tokens=True) for x in ref]


def test_16_concurrent_greedy_requests_match_transformers(aclient, qwen3_moe_dir):
    texts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(16)]
    tok, ids = token_ids(qwen3_moe_dir, texts)
    ref = hf_greedy(qwen3_moe_dir, ids, 12)

    async def go():
        c = openai.AsyncOpenAI(base_url=aclient + "/v1", api_key="none", max_retries=0)
        rs = await asyncio.gather(*(c.completions.create(model="qwen-test", prompt=t, max_tokens=12,
                                                         temperature=0) for t in texts))
        return [r.choices[0].text for r in rs]

    assert asyncio.run(go()) == [tok.decode(x, skip_special_tokens=True) for x in ref]


def test_streaming_with_usage_equals_non_streaming(client):
    # 120 tokens: a reader that falls behind gets the deltas since its last read merged into one chunk (as
    # vLLM's output collector does), so a short stream may come in two chunks; a long one cannot
    opts = dict(model="qwen-test", prompt=PROMPTS[1], max_tokens=120, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**opts)
    chunks = list(client.completions.create(**opts, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 120
    assert sum(1 for c in chunks if c.choices) > 2


@pytest.mark.parametrize("finish_reason,stop_reason,usage", [(None, None, None), ("stop", "\n\n", (3, 4)),
                                                             ("length", 7, None)])
def test_streamed_completion_chunks_are_the_models_bytes(finish_reason, stop_reason, usage):
    """The msgspec-encoded chunk the stream sends per token against the pydantic model it stands in for."""
    from epplat.core.server.protocol import CompletionChoice, CompletionStreamResponse, UsageInfo
    from epplat.core.server.serving import completion_chunk_json
    usage = UsageInfo.of(*usage) if usage else None
    text = 'a "quoted" \u00e9 \\ tab\t'
    want = CompletionStreamResponse(id="cmpl-1", created=5, model="m", usage=usage, choices=[
        CompletionChoice(index=2, text=text, finish_reason=finish_reason, stop_reason=stop_reason)]).model_dump_json()
    assert completion_chunk_json("cmpl-1", 5, "m", 2, text, finish_reason, stop_reason, usage) == want.encode()


def test_chat_uses_the_template_and_matches_transformers(client, qwen3_moe_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(prompt, add_special_tokens=False)
    ref = hf_greedy(qwen3_moe_dir, [ids], 10)[0]
    r = client.chat.completions.create(model="qwen-test", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(ref, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="qwen-test", messages=msgs, max_tokens=10, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content


def test_stop_strings(client):
    full = client.completions.create(model="qwen-test", prompt=PROMPTS[2], max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert len(stop) == 2
    r = client.completions.create(model="qwen-test", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="qwen-test", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_n_greater_than_one_and_seeds(client):
    r = client.completions.create(model="qwen-test", prompt=PROMPTS[3], max_tokens=12, temperature=1.0, n=3,
                                  seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    again = client.completions.create(model="qwen-test", prompt=PROMPTS[3], max_tokens=12, temperature=1.0, n=3,
                                      seed=7)
    key = lambda resp: [c.text for c in sorted(resp.choices, key=lambda c: c.index)]  # noqa: E731
    assert key(r) == key(again)
    assert len(set(key(r))) > 1
    assert 3 <= r.usage.completion_tokens <= 36


def test_sampling_rules_reach_the_sampler(client):
    """Each filter, set through the API, narrows temperature-1.5 sampling to the greedy token (top_p
    tiny, min_p 1, top_k 1); without one, the same seeded request samples something else.
    (tests/test_sampling.py checks the rules' distributions themselves.)"""
    def texts(**kw):
        extra = {k: kw.pop(k) for k in ("top_k", "min_p") if k in kw}
        r = client.completions.create(model="qwen-test", prompt=PROMPTS[5], max_tokens=6, n=3, seed=11,
                                      extra_body={"ignore_eos": True, **extra}, **kw)
        return [c.text for c in r.choices]
    greedy = texts(temperature=0)[0]
    assert texts(temperature=1.5) != [greedy] * 3
    for rule in ({"top_p": 1e-6}, {"min_p": 1.0}, {"top_k": 1}):
        assert texts(temperature=1.5, **rule) == [greedy] * 3, rule


def test_logprobs(client):
    r = client.completions.create(model="qwen-test", prompt=PROMPTS[4], max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for t, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert l <= 0 and len(top) >= 3 and max(top.values()) == pytest.approx(l, abs=1e-5)
    c = client.chat.completions.create(model="qwen-test", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(len(x.top_logprobs) == 2 for x in content)


@pytest.mark.parametrize("body, status", [
    ({"model": "nope", "prompt": "x"}, 404),
    ({"model": "qwen-test"}, 400),
    ({"model": "qwen-test", "prompt": "x", "max_tokens": -1}, 400),
    ({"model": "qwen-test", "prompt": "x", "temperature": "hot"}, 400),
    ({"model": "qwen-test", "prompt": "x", "max_tokens": 100000}, 400),
    ({"model": "qwen-test", "prompt": [[1, 2], "mixed"]}, 400),
    ({"model": "qwen-test", "prompt": [999999999]}, 400),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(qwen_server, client, body, status):
    r = httpx.post(qwen_server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    ok = client.completions.create(model="qwen-test", prompt="still up?", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_malformed_json_is_400(qwen_server):
    r = httpx.post(qwen_server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def metric(url, name, **labels):
    """Sum of the samples of `name` whose labels include `labels` (0 if none yet)."""
    from prometheus_client.parser import text_string_to_metric_families
    total, seen = 0.0, False
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total, seen = total + s.value, True
    assert seen or labels, f"{name} not in /metrics"
    return total


def test_client_disconnect_aborts_and_frees_kv_blocks(qwen_server):
    url = qwen_server.url
    for stream in (True, False):
        before = metric(url, "vllm:request_success_total", finished_reason="abort")
        # 3000 tokens take seconds; the client leaves after a fraction of one
        body = {"model": "qwen-test", "prompt": "spin " * 20, "max_tokens": 3000, "temperature": 0,
                "ignore_eos": True, "stream": stream}
        if stream:
            _stream_then_drop(url, body)
        else:
            with pytest.raises(httpx.ReadTimeout):
                r = httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(2.0, read=0.2))
                pytest.fail(f"no timeout: {r.status_code} {r.text[:300]}")
        deadline = time.time() + 10
        while time.time() < deadline and (metric(url, "vllm:num_requests_running") > 0
                                          or metric(url, "vllm:kv_cache_usage_perc") > 0):
            time.sleep(0.2)
        assert metric(url, "vllm:num_requests_running") == 0
        assert metric(url, "vllm:kv_cache_usage_perc") == 0
        # it was aborted, not run to its end
        assert metric(url, "vllm:request_success_total", finished_reason="abort") == before + 1


def _stream_then_drop(url, body):
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                return
    pytest.fail("the stream ended before it was dropped")


VLLM_FAMILIES = {
    "counter": ["request_success", "prompt_tokens", "generation_tokens", "num_preemptions", "prefix_cache_queries",
                "prefix_cache_hits", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                "spec_decode_num_accepted_tokens"],
    "gauge": ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"],
    "histogram": ["time_to_first_token_seconds", "inter_token_latency_seconds",
                  "request_time_per_output_token_seconds", "e2e_request_latency_seconds",
                  "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                  "request_inference_time_seconds"]}


def scrape(url) -> dict:
    """{family name: (type, {(sample name, labels): value})} of /metrics, by prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families
    return {f.name: (f.type, {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples})
            for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}


def value(families, sample, **labels) -> float:
    fam = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    return sum(v for (n, lab), v in families[fam][1].items()
               if n == sample and all(dict(lab).get(k) == x for k, x in labels.items()))


def test_metrics_have_vllms_families_and_move_under_load(qwen_server, client):
    url, shared = qwen_server.url, "Experts are routed to tokens by a gate; " * 6
    client.completions.create(model="qwen-test", prompt=shared + "warm", max_tokens=2, temperature=0)
    # While a stream runs in the engine the gauges see it. How far the client has read says nothing of how
    # far the engine is (a stalled test process found a 1,500-token stream finished at its first chunk), so
    # the stream is one the engine cannot finish within the scrapes (3,900 tokens), closed after them.
    # A stalled test process (a full-suite run once stalled 2 s between a stream's headers and its scrapes)
    # can still see it end: such a try proves nothing and is made again.
    long = {"model": "qwen-test", "prompt": shared, "max_tokens": 3900, "ignore_eos": True, "stream": True}
    for _ in range(5):
        done = value(scrape(url), "vllm:request_success_total")
        with httpx.stream("POST", url + "/v1/completions", json=long, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            during = [scrape(url) for _ in range(3)]
        if all(value(d, "vllm:request_success_total") == done for d in during):    # the stream had not ended
            break
    else:
        pytest.fail("a 3,900-token stream ended before three scrapes, five times")
    assert max(value(d, "vllm:num_requests_running") for d in during) > 0
    assert max(value(d, "vllm:kv_cache_usage_perc") for d in during) > 0
    deadline = time.monotonic() + 20       # closed: aborted, its blocks freed
    while value(before := scrape(url), "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    for kind, names in VLLM_FAMILIES.items():
        for name in names:
            assert before.get(f"vllm:{name}", (None,))[0] == kind, (name, before.get(f"vllm:{name}"))
            assert all(dict(lab)["model_name"] == "qwen-test" for _, lab in before[f"vllm:{name}"][1])
    for name in ("epplat:engine_requests_received", "epplat:eplb_balancedness", "epplat:prompt_tokens_computed"):
        assert name in before

    lens = [24 + i for i in range(6)]

    async def load():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        return await asyncio.gather(*(c.completions.create(model="qwen-test", prompt=shared + str(i), max_tokens=n,
                                                           temperature=0, extra_body={"ignore_eos": True})
                                      for i, n in enumerate(lens)))
    usages = [r.usage for r in asyncio.run(load())]
    after = scrape(url)

    def moved(sample, **labels):
        return value(after, sample, **labels) - value(before, sample, **labels)
    out = [u.completion_tokens for u in usages]
    assert out == lens
    assert moved("vllm:request_success_total", finished_reason="length") == 6
    assert moved("vllm:generation_tokens_total") == sum(out)
    assert moved("vllm:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert moved("vllm:prefix_cache_queries_total") >= sum(u.prompt_tokens for u in usages) - 6
    assert moved("vllm:prefix_cache_hits_total") >= 6 * 16     # the shared prefix's first block, at least
    for hist in VLLM_FAMILIES["histogram"]:
        n = sum(o - 1 for o in out) if hist == "inter_token_latency_seconds" else 6
        assert moved(f"vllm:{hist}_count") == n, hist
        assert moved(f"vllm:{hist}_sum") > 0 or hist == "request_queue_time_seconds", hist
    assert value(after, "vllm:num_requests_running") == value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == 0
    # vLLM's periodic line (EPPLAT_LOG_STATS_INTERVAL=1 for this server): printed by a step at least 1 s after
    # the last one, so keep the engine stepping (bounded) until a step has come that late
    line = (r"Engine 000: Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: [\d.]+ "
            r"tokens/s, Running: \d+ reqs, Waiting: \d+ reqs, GPU KV cache usage: [\d.]+%, Prefix cache "
            r"hit rate: [\d.]+%")
    deadline = time.monotonic() + 20
    while not re.search(line, qwen_server.output()) and time.monotonic() < deadline:
        client.completions.create(model="qwen-test", prompt="tick", max_tokens=4, temperature=0)
        time.sleep(0.2)
    assert re.search(line, qwen_server.output())


def test_tokenize_detokenize_ping_load(qwen_server, qwen3_moe_dir):
    from transformers import AutoTokenizer
    tok, url = AutoTokenizer.from_pretrained(qwen3_moe_dir), qwen_server.url
    text = "Experts are routed, tokens are gated."
    r = httpx.post(url + "/tokenize", json={"model": "qwen-test", "prompt": text, "return_token_strs": True}).json()
    ids = tok.encode(text)
    assert r == {"count": len(ids), "max_model_len": 4096, "tokens": ids, "token_strs": tok.convert_ids_to_tokens(ids)}
    messages = [{"role": "user", "content": "hello"}]
    r = httpx.post(url + "/tokenize", json={"messages": messages}).json()
    chat_ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False)
    assert r == {"count": len(chat_ids), "max_model_len": 4096, "tokens": chat_ids, "token_strs": None}
    assert httpx.post(url + "/detokenize", json={"model": "qwen-test", "tokens": chat_ids}).json() == {
        "prompt": tok.decode(chat_ids)}
    for path, body, status in (("/tokenize", {}, 400), ("/tokenize", {"prompt": 3}, 400),
                               ("/tokenize", {"model": "nope", "prompt": "x"}, 404),
                               ("/detokenize", {"tokens": [len(tok) + 10**6]}, 400),
                               ("/detokenize", {"tokens": "1 2"}, 400)):
        r = httpx.post(url + path, json=body)
        assert r.status_code == status and r.json()["error"]["message"], (path, body, r.text)
    assert httpx.post(url + "/tokenize", content=b"{").status_code == 400
    assert httpx.get(url + "/ping").status_code == httpx.post(url + "/ping").status_code == 200
    assert httpx.get(url + "/load").json() == {"server_load": 0}
    body = {"model": "qwen-test", "prompt": "load", "max_tokens": 3900, "ignore_eos": True, "stream": True}
    for _ in range(5):
        done = metric(url, "vllm:request_success_total")
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()      # kept: a dropped iterator closes the stream
            next(lines)
            load = httpx.get(url + "/load").json()
            if metric(url, "vllm:request_success_total") == done:   # not yet finished, so not yet all sent
                assert load == {"server_load": 1}
                break
    else:
        pytest.fail("a 3,900-token stream ended before /load was read, five times")
    deadline = time.time() + 10
    while httpx.get(url + "/load").json()["server_load"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(url + "/load").json() == {"server_load": 0}


def test_api_key_protects_v1(qwen3_moe_dir):
    with Server(str(qwen3_moe_dir), "--dtype", "float32", "--api-key", "s3cret", "--max-model-len", "256") as s:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert c.completions.create(model=str(qwen3_moe_dir), prompt="x", max_tokens=2).choices


def test_mixtral_and_preemption_under_tiny_kv_cache(mixtral_dir):
    texts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(8)]
    tok, ids = token_ids(mixtral_dir, texts)
    ref = hf_greedy(mixtral_dir, ids, 16)
    with Server(str(mixtral_dir), "--dtype", "float32", "--max-model-len", "40", "--block-size", "8",
                "--num-gpu-blocks-override", "8") as s:
        async def go():
            c = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
            rs = await asyncio.gather(*(c.completions.create(model=str(mixtral_dir), prompt=p, max_tokens=16,
                                                             temperature=0) for p in ids))
            return [r.choices[0].text for r in rs]
        assert asyncio.run(go()) == [tok.decode(x, skip_special_tokens=True) for x in ref]
        assert metric(s.url, "vllm:num_preemptions_total") > 0
        assert "KV cache size: 64 tokens" in s.output()
        assert "Maximum concurrency for 40 tokens per request: 1.60x" in s.output()


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_bench_serve_load_generator(qwen_server, qwen3_moe_dir, endpoint):
    from epplat.tools.bench_serve import run_benchmark
    r = run_benchmark(qwen_server.url, "qwen-test", num_prompts=6, input_len=12, output_len=5, concurrency=3,
                      tokenizer_dir=str(qwen3_moe_dir), endpoint=endpoint)
    assert r["completed"] == 6 and r["failed"] == 0, r
    assert r["total_output_tokens"] == 30 and r["output_throughput"] > 0 and r["median_ttft_ms"] > 0
