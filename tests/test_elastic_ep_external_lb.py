"""Elastic EP with external load balancing on loopback: two `epplat serve --data-parallel-rank N` servers
(gloo, EP, EPLB with redundant experts) form a group; a third started later joins it, then the middle one
is stopped with SIGTERM and leaves it (the one above it moves down). Batches and streams on the other
servers run throughout, through the openai client; every completion equals transformers' greedy tokens,
none fails, streams started while the group re-forms end after it, and the experts are re-placed."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import signal
import threading
import time

import httpx
import openai
import pytest

from hf_oracle import hf_greedy, hf_greedy_texts
from server_utils import Server, rpc_port
from test_elastic_ep import POOL, SHORT, STREAM_PROMPT, STREAM_TOKENS, _batch, _Load, _Stream


@pytest.fixture(scope="module")
def expected(skewed_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(skewed_dir)
    ids = hf_greedy(skewed_dir, [STREAM_PROMPT], STREAM_TOKENS, ignore_eos=True)[0]
    return hf_greedy_texts(skewed_dir, POOL, SHORT), tok.decode(ids, skip_special_tokens=True)


def _client(s: Server):
    return openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=180)


def _wait_for(s: Server, pattern: str, timeout: float = 120) -> float:
    """When ``pattern`` (a regular expression) showed in the server's log."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, s.output()):
        assert time.monotonic() < deadline, (pattern, s.output()[-3000:])
        time.sleep(0.02)
    return time.monotonic()


def _traffic(servers, model, expected):
    """Batches on every server, a stream on each, all checked at the end (``_check``)."""
    return [(_Load(_client(s), model, expected[0]), _Stream(_client(s), model)) for s in servers]


def _check(traffic, expected) -> None:
    for load, stream in traffic:
        rounds = load.rounds
        while load.rounds < rounds + 1 and load.thread.is_alive():    # a batch after the re-forming
            time.sleep(0.05)
        load.stop()
        assert load.failures == [], load.failures
        assert stream.result() == expected[1]


@pytest.mark.slow
def test_a_server_joins_and_one_stopped_with_sigterm_leaves(skewed_dir, expected):
    model, port = str(skewed_dir), rpc_port()
    env = {"OMP_NUM_THREADS": "1"}      # three servers' engines step together on the test machine's cores
    eplb = {"window_size": 8, "step_interval": 1000, "num_redundant_experts": 2}
    common = ["--dtype", "float32", "-ep", "--enable-elastic-ep", "--enable-eplb", "--eplb-config", json.dumps(eplb),
              "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(port), "--max-model-len", "1024",
              "--max-num-seqs", "8", "--distributed-timeout-seconds", "60"]
    servers = {}
    t = threading.Thread(target=lambda: servers.setdefault(1, Server(model, *common, "--data-parallel-size", "2",
                                                                     "--data-parallel-rank", "1", env=env)))
    t.start()
    try:
        servers[0] = Server(model, *common, "--data-parallel-size", "2", "--data-parallel-rank", "0", env=env)
        t.join(120)
        s0, s1 = servers[0], servers[1]

        # join: server 2 starts while both others serve batches and streams
        traffic = _traffic([s0, s1], model, expected)
        box = {}
        joiner = threading.Thread(target=lambda: box.setdefault("s2", Server(
            model, *common, "--data-parallel-size", "3", "--data-parallel-rank", "2", env=env)))
        joiner.start()
        _wait_for(s0, r"elastic EP: server 2 joins the group: 2 -> 3 DP ranks \(world generation 1\)")
        across = [_Stream(_client(s), model) for s in (s0, s1)]
        formed = _wait_for(s0, r"elastic EP: 2 -> 3 DP ranks \(world generation 1\): \d+ expert moves")
        joiner.join(180)
        s2 = servers[2] = box["s2"]
        _check(traffic, expected)
        for st in across:
            assert st.result() == expected[1]
            assert st.last > formed, "the stream started as the group re-formed ended before it had re-formed"
        log2 = s2.output()
        assert "EP rank 2/3 holds physical experts 10-14 of 15" in log2
        assert "joining the running group as DP rank 2 of 3 (world generation 1)" in log2
        with cf.ThreadPoolExecutor(3) as pool:
            assert _batch(_client(s2), model, pool) == expected[0]

        # leave: server 1 (DP rank 1 of 3) gets SIGTERM; server 2 becomes DP rank 1
        traffic = _traffic([s0, s2], model, expected)
        os.killpg(s1.proc.pid, signal.SIGTERM)
        _wait_for(s0, r"elastic EP: server 1 leaves the group: 3 -> 2 DP ranks \(world generation 2\)")
        across = [_Stream(_client(s), model) for s in (s0, s2)]
        formed = _wait_for(s0, r"elastic EP: 3 -> 2 DP ranks \(world generation 2\): \d+ expert moves")
        assert s1.proc.wait(120) == 0, s1.output()[-3000:]
        _check(traffic, expected)
        for st in across:
            assert st.result() == expected[1]
            assert st.last > formed, "the stream started as the group re-formed ended before it had re-formed"
        log1 = s1.output()
        assert "DP rank 1 handed its experts over and leaves" in log1
        assert "elastic EP: DP rank 1 (server 1) left the group (world generation 2)" in log1
        assert "elastic EP: rank 1 joined world generation 2 of 2 ranks" in s2.output()    # server 2 moved down
        for s in (s0, s2):
            with cf.ThreadPoolExecutor(3) as pool:
                assert _batch(_client(s), model, pool) == expected[0]
        answer = httpx.post(s2.url + "/scale_elastic_ep", json={"new_data_parallel_size": 3})
        assert answer.status_code == 400 and "joins the group and one stopped (SIGTERM) leaves it" in answer.text
    finally:
        t.join(120)
        for s in sorted(servers.items(), reverse=True):    # DP rank 0 (the group's store) last
            s[1].stop()
