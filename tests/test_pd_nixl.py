"""Prefill/decode disaggregation through the real `nixl` package on the cpu platform: a prefill
server (DP=2 with EP) and a decode server of another layout (TP=2 x PP=2: each rank reads its own KV
heads of its stage's layer of every block) as separate `epplat serve` processes, both kv_both so that
the PP x TP server is also a prefill side for the DP=2 one (each decode rank reads every block's heads
from both prefill TP ranks of both stages, each stage's ranks serving their own layer); the decode side
READs the prefill side's KV blocks (UCX over host memory) and its greedy tokens equal
transformers', streaming and not, for prompts shorter and longer than a block, from vLLM's
placeholder prompt; it computes only each prompt's last token (its metrics). Faults: blocks that
expired on the prefill side and a dead prefill server are recomputed on the decode side (same
tokens); the prefill side frees every held block; the pair runs without a given secret, as vLLM's PD
commands do (an open side channel, said once); a handshake between different KV layouts is
refused with a clear error; a peer without the deployment's secret is refused on the side channel.
`epplat proxy` chains the two (streaming and not, chat too), and a client that leaves mid-stream
aborts its request on the decoder. vLLM's PD client script (its Expert Parallel Deployment doc) runs
unmodified but for its URLs against the pair, and vLLM's toy P/D proxy unmodified in front of it
(both read out of vLLM's sdist)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from hf_oracle import hf_greedy
from server_utils import Server, free_port
from test_server import metric

pytest.importorskip("nixl")

PLACEHOLDER = "This prompt is ignored during decode"
PROMPTS = [[11, 12, 13, 14, 15], [(5 * i + 7) % 1900 + 20 for i in range(40)]]   # 1 block, 3 blocks of 16
TIMEOUT_S = 12   # held blocks expire after this; long enough for a loaded 2-core CI machine to read them first


def kv(role):
    return json.dumps({"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu",
                       "kv_connector_extra_config": {"backends": ["UCX"]}})


@pytest.fixture(scope="module")
def pd(qwen3_moe_dir, tmp_path_factory):
    # greedy unless a request says otherwise (vLLM's doc client script sets no temperature)
    greedy = tmp_path_factory.mktemp("greedy")
    (greedy / "generation_config.json").write_text(json.dumps({"temperature": 0.0}))
    common = ("--dtype", "float32", "--max-model-len", "512", "--generation-config", str(greedy))
    # no --internal-secret, as vLLM's PD commands run: each server makes its own for its internal sockets,
    # and the KV side channel is open (as vLLM's), with one warning
    env = {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port(2)), "VLLM_NIXL_ABORT_REQUEST_TIMEOUT": str(TIMEOUT_S),
           "EPPLAT_INTERNAL_SECRET": ""}
    # both kv_both: DP=2 -> TP=2 x PP=2 (each decode rank reads its heads of its layer from one prefill rank's
    # blocks) and, for test_tp2_pp2_prefill_to_dp2_decode, back (each decode rank reads from all 4 prefill ranks)
    with Server(str(qwen3_moe_dir), *common, "--data-parallel-size", "2", "--enable-expert-parallel",
                "--kv-transfer-config", kv("kv_both"), env=env, timeout=240) as prefill, \
            Server(str(qwen3_moe_dir), *common, "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
                   "--kv-transfer-config", kv("kv_both"),
                   env={**env, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port(1))}, timeout=240) as decode:
        yield prefill, decode


def prefill_call(server, ids):
    """vLLM's prefill request: max_tokens 1, do_remote_decode; returns what the decode call needs."""
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "prompt": ids, "max_tokens": 1, "temperature": 0,
        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                               "remote_block_ids": None, "remote_host": None, "remote_port": None}})
    assert r.status_code == 200, r.text
    return r.json()["kv_transfer_params"]


def decode_call(server, params, max_tokens, stream=False):
    body = {"prompt": PLACEHOLDER, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "kv_transfer_params": params, "stream": stream}
    if not stream:
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    text = ""
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


def prefill_blocks_free(prefill, deadline_s=TIMEOUT_S + 6):
    t0 = time.time()
    while time.time() - t0 < deadline_s:
        if metric(prefill.url, "vllm:kv_cache_usage_perc") == 0.0:
            return True
        time.sleep(0.2)
    return False


def test_pd_split_greedy_tokens_equal_transformers(pd, qwen3_moe_dir):
    from transformers import AutoTokenizer
    prefill, decode = pd
    tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    want = [tok.decode(w, skip_special_tokens=True) for w in hf_greedy(qwen3_moe_dir, PROMPTS, 8, ignore_eos=True)]
    computed0 = metric(decode.url, "epplat:prompt_tokens_computed_total")
    got = []
    for ids, stream in [(PROMPTS[0], False), (PROMPTS[1], False), (PROMPTS[1], True)]:
        params = prefill_call(prefill, ids)
        assert params["do_remote_prefill"] and params["remote_block_ids"] and params["remote_port"]
        got.append(decode_call(decode, params, 8, stream))
    assert got == [want[0], want[1], want[1]]
    for server in pd:       # no secret given: the side channel is open, and each server says so
        assert "its KV side channel accepts any peer" in server.output()
    # the decode side computed only each prompt's last token; it received the rest
    assert metric(decode.url, "epplat:prompt_tokens_computed_total") - computed0 == 3
    # both DP ranks of the prefill side serve their own blocks: each has its own side channel port
    ports = set()
    for round_ in range(5):             # least-loaded routing spreads concurrent requests over the DP ranks
        with ThreadPoolExecutor(4) as pool:
            held = list(pool.map(lambda i: prefill_call(prefill, [round_ * 4 + i + 1, *PROMPTS[1]]), range(4)))
        ports |= {p["remote_port"] for p in held}
        if len(ports) == 2:
            break
    assert len(ports) == 2, ports
    assert prefill_blocks_free(prefill), "the prefill side kept blocks no decoder will read"


def test_proxy_chains_prefill_and_decode(pd, qwen3_moe_dir):
    import openai
    from transformers import AutoTokenizer
    prefill, decode = pd
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "epplat.cli", "proxy", "--host", "127.0.0.1", "--port", str(port),
                             "--prefiller-hosts", "127.0.0.1", "--prefiller-ports", str(prefill.port),
                             "--decoder-hosts", "127.0.0.1", "--decoder-ports", str(decode.port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                health = httpx.get(url + "/healthcheck", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert health == {"status": "ok", "prefill_instances": 1, "decode_instances": 1}
        tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
        prompt = [(11 * i + 5) % 1900 + 40 for i in range(21)]
        want = tok.decode(hf_greedy(qwen3_moe_dir, [prompt], 8, ignore_eos=True)[0], skip_special_tokens=True)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        computed0 = metric(decode.url, "epplat:prompt_tokens_computed_total")
        r = client.completions.with_raw_response.create(model=str(qwen3_moe_dir), prompt=prompt, max_tokens=8,
                                                         temperature=0, extra_body={"ignore_eos": True},
                                                         extra_headers={"X-Request-Id": "via-proxy"})
        assert r.parse().choices[0].text == want and r.headers["X-Request-Id"] == "via-proxy"
        stream = client.completions.create(model=str(qwen3_moe_dir), prompt=prompt, max_tokens=8, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in stream if c.choices) == want
        recomputed = [l for l in decode.output().splitlines() if "computing its prompt here" in l]
        assert metric(decode.url, "epplat:prompt_tokens_computed_total") - computed0 == 2, recomputed
        bad = httpx.post(url + "/v1/completions", json={"prompt": "x", "temperature": -1}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"   # the prefiller's answer
        assert httpx.post(url + "/v1/completions", content=b"{", timeout=30).status_code == 400
        chat = client.chat.completions.create(model=str(qwen3_moe_dir), messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, temperature=0)
        assert chat.choices[0].message.content is not None and chat.usage.completion_tokens == 4
        # sampling fields through the proxy: the decode side's answer equals one server's without P/D (the
        # decode server itself, called directly); the first greedy token's text as a stop string, which
        # min_tokens overrides
        direct = openai.OpenAI(base_url=decode.url + "/v1", api_key="none", max_retries=0)
        first = tok.decode(hf_greedy(qwen3_moe_dir, [prompt], 1, ignore_eos=True)[0])
        for fields in [dict(temperature=0, stop=[first], logprobs=2, extra_body={"ignore_eos": True}),
                       dict(temperature=0, stop=[first], logprobs=2, extra_body={"ignore_eos": True, "min_tokens": 5}),
                       dict(temperature=1.0, seed=1234, top_p=0.9, logprobs=1)]:
            a, b = (c.completions.create(model=str(qwen3_moe_dir), prompt=prompt, max_tokens=8, **fields)
                    for c in (client, direct))
            ca, cb = a.choices[0], b.choices[0]
            assert (ca.text, ca.finish_reason, a.usage.completion_tokens) == \
                (cb.text, cb.finish_reason, b.usage.completion_tokens), fields
            assert ca.logprobs.tokens == cb.logprobs.tokens and len(ca.logprobs.top_logprobs) == len(cb.logprobs.tokens)
            assert ca.logprobs.token_logprobs == pytest.approx(cb.logprobs.token_logprobs, abs=1e-3)
        assert a.usage.completion_tokens == 8
        stops = [client.completions.create(model=str(qwen3_moe_dir), prompt=prompt, max_tokens=8, temperature=0,
                                           stop=[first], extra_body={"min_tokens": m}).usage.completion_tokens
                 for m in (0, 5)]
        assert stops[0] < 5 <= stops[1], stops           # the stop string ended it, unless min_tokens held it
        with pytest.raises(openai.BadRequestError, match="n > 1 with a remote prefill"):
            client.completions.create(model=str(qwen3_moe_dir), prompt=prompt, max_tokens=4, n=2)
        # a client that leaves mid-stream: the proxy closes its call, which aborts the request on the decoder
        aborted0 = metric(decode.url, "vllm:request_success_total", finished_reason="abort")
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                "prompt": prompt, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
            chunks = r.iter_lines()
            assert [next(chunks) for _ in range(3)]
        t0 = time.time()
        while metric(decode.url, "vllm:request_success_total", finished_reason="abort") == aborted0:
            assert time.time() - t0 < 10, "the decoder did not abort the request the client left"
            time.sleep(0.1)
        assert metric(decode.url, "vllm:num_requests_running") == 0
        assert prefill_blocks_free(prefill, 4) and metric(decode.url, "vllm:kv_cache_usage_perc") == 0.0
        # a client that leaves while its prefill call is in flight (the prefill server's API process stopped
        # meanwhile, so the call cannot end first): the proxy closes that call, so the prefill server aborts
        # the request, or, when it had finished, frees the blocks it held for a decoder at once (not after
        # VLLM_NIXL_ABORT_REQUEST_TIMEOUT); no decoder is called
        body = json.dumps({"prompt": prompt, "max_tokens": 8, "temperature": 0}).encode()
        decoded0 = metric(decode.url, "vllm:request_success_total")
        os.kill(prefill.proc.pid, signal.SIGSTOP)
        try:
            with socket.create_connection(("127.0.0.1", port)) as client_sock:
                client_sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: "
                                    b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                time.sleep(0.5)         # the proxy has sent the prefill call
            time.sleep(0.5)             # the proxy has seen the client leave
        finally:
            os.kill(prefill.proc.pid, signal.SIGCONT)
        # within 6 s: without the release the blocks stay held until TIMEOUT_S (12 s)
        assert prefill_blocks_free(prefill, 6), "the prefill server held the blocks of a client that left"
        assert metric(prefill.url, "vllm:num_requests_running") == 0
        assert metric(decode.url, "vllm:request_success_total") == decoded0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    assert prefill_blocks_free(prefill)


def test_vllm_doc_client_script_unmodified(pd, qwen3_moe_dir):
    """vLLM's PD client script (its Expert Parallel Deployment doc, read out of vLLM's sdist), run as it
    is but for its two URLs: it prints the decode side's answer to the doc's prompt, which must be
    transformers' greedy continuation (up to EOS or the script's 150 tokens) of the prompt the
    prefill side computed, the decode side computing only its last token."""
    from transformers import AutoTokenizer

    from vllm_sdist import doc_client_script
    prefill, decode = pd
    script = doc_client_script()
    for url, ours in [("http://192.168.1.100:8000/v1", prefill.url + "/v1"),
                      ("http://192.168.1.101:8001/v1", decode.url + "/v1")]:
        assert script.count(url) == 1, url
        script = script.replace(url, ours)
    prompt = re.search(r'prompt="(Write a detailed[^"]*)"', script).group(1)
    tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    ids = tok(prompt).input_ids
    assert len(ids) > 16, "the doc's prompt must span more than a block"
    computed0 = metric(decode.url, "epplat:prompt_tokens_computed_total")
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    want = tok.decode(hf_greedy(qwen3_moe_dir, [ids], 150)[0], skip_special_tokens=True)   # while the script runs
    stdout, stderr = run.communicate(timeout=180)
    assert "Decode completed successfully" in stdout, stdout + stderr
    assert stdout.split("Final response: ", 1)[1] == want + "\n"
    assert metric(decode.url, "epplat:prompt_tokens_computed_total") - computed0 == 1
    assert prefill_blocks_free(prefill)


def test_vllm_toy_proxy_unmodified(pd, qwen3_moe_dir, tmp_path):
    """The toy P/D proxy of vLLM's NIXL integration tests (from vLLM's sdist), run as it is in front of
    the pair: a completion and a streamed chat through it, with the real `openai` client, give
    transformers' greedy tokens, the decode side computing only each prompt's last token."""
    import openai
    from transformers import AutoTokenizer

    from vllm_sdist import TOY_PROXY, read
    prefill, decode = pd
    script = tmp_path / "toy_proxy_server.py"
    script.write_text(read(TOY_PROXY))
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(script), "--port", str(port),
                             "--prefiller-hosts", "127.0.0.1", "--prefiller-ports", str(prefill.port),
                             "--decoder-hosts", "127.0.0.1", "--decoder-ports", str(decode.port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/healthcheck", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
        prompt = [(13 * i + 1) % 1900 + 30 for i in range(23)]
        want = tok.decode(hf_greedy(qwen3_moe_dir, [prompt], 6, ignore_eos=True)[0], skip_special_tokens=True)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        computed0 = metric(decode.url, "epplat:prompt_tokens_computed_total")
        out = client.completions.create(model=str(qwen3_moe_dir), prompt=prompt, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == want
        messages = [{"role": "user", "content": "hello toy proxy"}]     # a prompt no other test has cached
        whole = openai.OpenAI(base_url=decode.url + "/v1", api_key="none", max_retries=0).chat.completions.create(
            model=str(qwen3_moe_dir), messages=messages, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
        chunks = client.chat.completions.create(model=str(qwen3_moe_dir), messages=messages, max_tokens=5,
                                                temperature=0, stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True})
        chunks = list(chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            whole.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == 5
        # the uncached chat prompt of the direct call was computed whole; the two through the proxy, 1 token each
        assert metric(decode.url, "epplat:prompt_tokens_computed_total") - computed0 == \
            1 + 1 + whole.usage.prompt_tokens
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    assert prefill_blocks_free(prefill)


def test_vllm_toy_proxy_flow_with_the_openai_client(pd, qwen3_moe_dir):
    """vLLM's toy proxy flow, step by step, through the real `openai` client: the prefill copy of the
    request without stream and stream_options (and min_tokens, which the decode call carries),
    max_tokens 1 and vLLM's do_remote_decode kv_transfer_params; the decode call the original request
    (streamed, with stream_options) plus the kv_transfer_params the prefill response carries; the same
    X-Request-Id to both. Completions and chat."""
    import openai
    from transformers import AutoTokenizer
    prefill, decode = pd
    tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    pc = openai.OpenAI(base_url=prefill.url + "/v1", api_key="none", max_retries=0)
    dc = openai.OpenAI(base_url=decode.url + "/v1", api_key="none", max_retries=0)
    remote_decode = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                     "remote_block_ids": None, "remote_host": None, "remote_port": None}
    prompt = [(7 * i + 3) % 1900 + 50 for i in range(19)]
    want = tok.decode(hf_greedy(qwen3_moe_dir, [prompt], 6, ignore_eos=True)[0], skip_special_tokens=True)
    request = {"model": str(qwen3_moe_dir), "prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}}
    extra = {"ignore_eos": True}
    computed0 = metric(decode.url, "epplat:prompt_tokens_computed_total")
    prefill_req = {k: v for k, v in request.items() if k not in ("stream", "stream_options")}
    first = pc.completions.create(**{**prefill_req, "max_tokens": 1}, extra_headers={"X-Request-Id": "toy-1"},
                                  extra_body={"ignore_eos": True, "kv_transfer_params": remote_decode})
    params = first.kv_transfer_params
    assert params["do_remote_prefill"] and params["remote_request_id"] == "cmpl-toy-1-0", params
    chunks = list(dc.completions.create(**request, extra_headers={"X-Request-Id": "toy-1"},
                                        extra_body={**extra, "kv_transfer_params": params}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == len(prompt)
    assert metric(decode.url, "epplat:prompt_tokens_computed_total") - computed0 == 1
    # chat: the same flow; the decode side continues the conversation the prefill side computed
    messages = [{"role": "user", "content": "hello there"}]
    whole = dc.chat.completions.create(model=str(qwen3_moe_dir), messages=messages, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    first = pc.chat.completions.create(model=str(qwen3_moe_dir), messages=messages, max_tokens=1, temperature=0,
                                       extra_headers={"X-Request-Id": "toy-2"},
                                       extra_body={"ignore_eos": True, "kv_transfer_params": remote_decode})
    chunks = dc.chat.completions.create(model=str(qwen3_moe_dir), messages=messages, max_tokens=5, temperature=0,
                                        stream=True, extra_headers={"X-Request-Id": "toy-2"},
                                        extra_body={"ignore_eos": True, "kv_transfer_params": first.kv_transfer_params})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert prefill_blocks_free(prefill)


def test_tp2_pp2_prefill_to_dp2_decode(pd, qwen3_moe_dir):
    """A TP=2 x PP=2 prefill side (each rank serves its own KV heads of its stage's layer, leased at its own
    port, announced by the DP rank's one side channel) and a decode side of TP=1 per DP rank that reads each
    block's heads and layers from all four prefill ranks: greedy tokens equal transformers' through the
    openai client, streaming and not; the decode side computes only each prompt's last token; every prefill
    rank frees its blocks."""
    import openai
    from transformers import AutoTokenizer
    dp2, tp2 = pd
    tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    prompts = [[(13 * i + k) % 1900 + 60 for i in range(n)] for k, n in ((3, 9), (4, 37))]
    want = [tok.decode(w, skip_special_tokens=True) for w in hf_greedy(qwen3_moe_dir, prompts, 8, ignore_eos=True)]
    pc = openai.OpenAI(base_url=tp2.url + "/v1", api_key="none", max_retries=0)
    dc = openai.OpenAI(base_url=dp2.url + "/v1", api_key="none", max_retries=0)
    remote_decode = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                     "remote_block_ids": None, "remote_host": None, "remote_port": None}
    computed0 = metric(dp2.url, "epplat:prompt_tokens_computed_total")
    got = []
    for ids, stream in [(prompts[0], False), (prompts[1], True)]:
        first = pc.completions.create(model=str(qwen3_moe_dir), prompt=ids, max_tokens=1, temperature=0,
                                      extra_body={"ignore_eos": True, "kv_transfer_params": remote_decode})
        params = first.kv_transfer_params
        assert params["tp_size"] == 2 and params["remote_block_ids"], params
        out = dc.completions.create(model=str(qwen3_moe_dir), prompt=PLACEHOLDER, max_tokens=8, temperature=0,
                                    stream=stream, extra_body={"ignore_eos": True, "kv_transfer_params": params})
        got.append("".join(c.choices[0].text for c in out) if stream else out.choices[0].text)
    assert got == want, dp2.output()[-3000:]
    assert metric(dp2.url, "epplat:prompt_tokens_computed_total") - computed0 == 2, dp2.output()[-3000:]
    assert "computing its prompt here" not in dp2.output()
    assert prefill_blocks_free(tp2, 6), "a prefill rank kept blocks its reader had read"


def test_expired_blocks_and_dead_prefill_are_recomputed_on_decode(pd, qwen3_moe_dir):
    from transformers import AutoTokenizer
    prefill, decode = pd
    tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    fresh = [[(3 * i + k) % 1900 + 30 for i in range(40)] for k in (1, 2)]     # nothing of them cached anywhere
    want = [tok.decode(w, skip_special_tokens=True) for w in hf_greedy(qwen3_moe_dir, fresh, 6, ignore_eos=True)]
    expired = prefill_call(prefill, fresh[0])
    assert prefill_blocks_free(prefill), "held blocks not freed after VLLM_NIXL_ABORT_REQUEST_TIMEOUT"
    computed0 = metric(decode.url, "epplat:prompt_tokens_computed_total")
    assert decode_call(decode, expired, 6) == want[0]
    assert metric(decode.url, "epplat:prompt_tokens_computed_total") - computed0 == 40    # recomputed here
    orphan = prefill_call(prefill, fresh[1])
    prefill.stop()
    assert decode_call(decode, orphan, 6) == want[1]
    log = decode.output()
    assert "holds no blocks here" in log and "Connection refused" in log and "computing its prompt here" in log
    assert metric(decode.url, "vllm:kv_cache_usage_perc") == 0.0


def test_handshake_refuses_a_different_kv_layout_and_an_unauthenticated_peer(qwen3_moe_dir):
    import torch
    from epplat.config import CacheConfig, EngineConfig, KVTransferConfig, ModelConfig, ParallelConfig
    from epplat.connectors import side_channel
    from epplat.connectors.base import KVConnectorRole
    from epplat.connectors.nixl import NixlConnector
    from epplat.core.engine.frame_auth import FrameAuth
    port = free_port()
    sides = []
    for role, dtype in (("kv_producer", torch.float32), ("kv_consumer", torch.bfloat16)):
        cfg = KVTransferConfig.parse(kv(role))
        eng = EngineConfig(ModelConfig(str(qwen3_moe_dir)), cache=CacheConfig(block_size=16), kv_transfer=cfg,
                           parallel=ParallelConfig(internal_secret="pd-secret"))
        os.environ["EPPLAT_NIXL_SIDE_CHANNEL_PORT"] = str(port)
        try:
            c = NixlConnector(cfg, eng, KVConnectorRole.WORKER)
        finally:
            del os.environ["EPPLAT_NIXL_SIDE_CHANNEL_PORT"]
        c.register_kv_caches([(torch.zeros(4, 16, 2, 32, dtype=dtype), torch.zeros(4, 16, 2, 32, dtype=dtype))])
        sides.append(c)
    with pytest.raises(RuntimeError, match=r"refused: different dtype \(here float32, there bfloat16\)"):
        sides[1]._handshake("127.0.0.1", port)
    # a peer without the deployment's secret is refused, and the channel keeps answering the others
    for secret in ("another-secret", "pd-secret"[:-1]):
        with pytest.raises(PermissionError, match="need the same --internal-secret"):
            side_channel.request("127.0.0.1", port, {"op": "lease", "request_id": "x"}, FrameAuth(secret))
    with socket.create_connection(("127.0.0.1", port)) as s:       # raw bytes: no tag at all
        s.sendall(b"\x00\x00\x00\x03abc")
        assert b"internal-secret" in s.recv(1000)
    r = side_channel.request("127.0.0.1", port, {"op": "lease", "request_id": "x"}, FrameAuth("pd-secret"))
    assert r == {"error": "request x holds no blocks here (finished reading, expired or unknown)"}
    sides[0].shutdown()
