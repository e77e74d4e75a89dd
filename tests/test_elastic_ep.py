"""Elastic EP end to end on the cpu platform: one real `epplat serve` (gloo, DP 2, EP, EPLB with
redundant experts) scaled 2 -> 3 -> 2 through POST /scale_elastic_ep while the openai client keeps
a streaming request and batches running. Every completion before, during and after equals
transformers' greedy tokens (and seeded random streams their tokens without a scale); a scale-down
moves the departing rank's running streams to a staying rank and answers before they end; the new rank is routed to; each error answer (400, 408, 409, 500
with the old size kept, a new rank killed while it starts or in the expert exchange) and the 503 with
Retry-After for requests beyond the bound during a scale are checked on the same server. With external
load balancing (a server per DP rank, on loopback) a server started later joins the group and one
stopped with SIGTERM leaves it, while the other servers keep serving."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from hf_oracle import hf_greedy, hf_greedy_texts
from server_utils import Server, free_ports

POOL = [[(i * 37 + j * 11) % 2000 + 3 for j in range(12)] for i in range(6)]
SHORT = 6
STREAM_PROMPT, STREAM_TOKENS, LONGER_TOKENS = [11, 222, 333, 44, 5], 160, 240
SEEDED = {"temperature": 1.0, "seed": 7, "extra_body": {"ignore_eos": True}}    # random, its tokens fixed by its seed
GRAMMAR = {"extra_body": {"ignore_eos": True, "structured_outputs": {"regex": "[a-z]{5000}"}}}   # cannot move: drains


@pytest.fixture(scope="module")
def model_dir(skewed_dir):
    return skewed_dir


@pytest.fixture(scope="module")
def expected(model_dir):
    return oracle_texts(model_dir)


@functools.lru_cache(maxsize=2)
def oracle_texts(model_dir) -> tuple[list[str], str, str]:
    """transformers' texts: the short batch prompts, the stream prompt's first STREAM_TOKENS and LONGER_TOKENS
    (kept: test_ray_backend's elastic scales run on the same checkpoint)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = hf_greedy(model_dir, [STREAM_PROMPT], LONGER_TOKENS, ignore_eos=True)[0]
    return (hf_greedy_texts(model_dir, POOL, SHORT), tok.decode(ids[:STREAM_TOKENS], skip_special_tokens=True),
            tok.decode(ids, skip_special_tokens=True))


def _scale(url: str, body, timeout: float = 180) -> httpx.Response:
    return httpx.post(url + "/scale_elastic_ep", content=body if isinstance(body, bytes) else json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=timeout)


def _requests_per_rank(url: str) -> dict[str, float]:
    """epplat:engine_requests_received by DP rank, the DP size gauge ("size") and the scales ("up", "down")."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in fam.samples:
            if sample.name == "epplat:engine_requests_received":
                out[sample.labels["dp_rank"]] = sample.value
            elif sample.name == "epplat:data_parallel_size":
                out["size"] = sample.value
            elif sample.name == "epplat:elastic_ep_scales_total":
                out[sample.labels["direction"]] = sample.value
    return out


def _batch(client, model, pool) -> list[str]:
    return list(pool.map(lambda p: client.completions.create(
        model=model, prompt=p, max_tokens=SHORT, temperature=0, extra_body={"ignore_eos": True}).choices[0].text,
        POOL))


class _Load:
    """Batches of the POOL prompts sent over and over on a thread; every answer is checked."""

    def __init__(self, client, model, short):
        self.client, self.model, self.short = client, model, short
        self.done, self.failures, self.rounds = threading.Event(), [], 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        with cf.ThreadPoolExecutor(3) as pool:
            while not self.done.is_set():
                try:
                    outs = _batch(self.client, self.model, pool)
                    if outs != self.short:
                        self.failures.append(f"tokens differ: {outs}")
                except Exception as e:     # noqa: BLE001 (any failure is a lost request)
                    self.failures.append(repr(e))
                self.rounds += 1

    def stop(self) -> None:
        self.done.set()
        self.thread.join(120)


class _Stream:
    """One streaming completion on a thread; its text and the longest gap between chunks."""

    def __init__(self, client, model, max_tokens=STREAM_TOKENS, sampling=None):
        self.text, self.error, self.gaps, self.last = "", None, [], 0.0
        self.started, self.cancelled = threading.Event(), threading.Event()

        def run():
            try:
                last = None
                with client.completions.create(model=model, prompt=STREAM_PROMPT, max_tokens=max_tokens, stream=True,
                                               **{"temperature": 0, "extra_body": {"ignore_eos": True},
                                                  **(sampling or {})}) as chunks:
                    for chunk in chunks:
                        now = time.monotonic()
                        if last is not None:
                            self.gaps.append(now - last)
                        last = self.last = now
                        self.text += chunk.choices[0].text
                        self.started.set()
                        if self.cancelled.is_set():
                            break       # the connection closes: the server aborts the request
            except Exception as e:     # noqa: BLE001
                self.error = e
            self.started.set()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.started.wait(60)

    def result(self) -> str:
        self.thread.join(180)
        assert self.error is None, self.error
        return self.text


def _scale_with_traffic(s: Server, client, model, expected, new_size: int, status=200,
                        message=None, seeded=None) -> None:
    """Scale to new_size under batches and streams (three started before it; longer ones sent right behind the
    scale request and then every second while it runs, so one is in flight across the re-forming however long
    the new ranks take to start, e.g. Ray actors); checks they all complete with the oracle's tokens, one of
    the longer ones ending after the scale's answer. ``seeded``: the text of the SEEDED stream without a
    scale; three of them run beside the others and must give it. Scaling down, the departing rank's streams move
    to a staying one: the scale answers before any stream started before it ends. The scale answers ``status``
    with ``message``."""
    short, long, longer = expected
    old = int(_requests_per_rank(s.url)["size"])
    grows = new_size > old
    # on the idle server the least-loaded router puts one of each three on each rank (of three)
    before = [_Stream(client, model) for _ in range(3)]
    randoms = [_Stream(client, model, sampling=SEEDED) for _ in range(3 if seeded else 0)]
    load = _Load(client, model, short)
    box = {}

    def scale():
        box["r"] = _scale(s.url, {"new_data_parallel_size": new_size, "drain_timeout": 120})
        box["done"] = time.monotonic()
    t0 = time.monotonic()
    thread = threading.Thread(target=scale)
    thread.start()
    across = []                   # (sent, stream): the first right behind the scale, then one a second
    while not across or thread.is_alive():
        across.append((time.monotonic(), _Stream(client, model, max_tokens=LONGER_TOKENS)))
        thread.join(1.0)
    thread.join(300)
    r = box["r"]
    assert r.status_code == status, r.text
    if status == 200:
        assert r.json() == {"message": f"Scaled to {new_size} data parallel engines"}
    else:
        assert message in r.json()["error"]["message"], r.text
    rounds = load.rounds
    while load.rounds < rounds + 2:        # batches after the scale, on the new set of ranks
        time.sleep(0.05)
    load.stop()
    assert [st.result() for st in before] == [long] * 3
    assert [st.result() for st in randoms] == [seeded] * len(randoms)
    assert [st.result() for _, st in across] == [longer] * len(across)
    if not grows and status == 200:
        ended = [st.last - box["done"] for st in before + randoms]
        assert min(ended) > 0, ("a scale-down waited for running streams", ended)
        leaving = re.escape(str(list(range(new_size, old))))
        moved = re.findall(rf"elastic EP: (\d+) requests moved off the departing DP ranks {leaving}", s.output())
        assert moved and int(moved[-1]) >= 1 + bool(seeded), moved      # a greedy and a seeded stream, at least
    assert any(sent < box["done"] < st.last for sent, st in across), (
        "no stream sent during the scale spanned its end", box["done"] - t0,
        [(sent - t0, st.last - t0) for sent, st in across])
    assert load.failures == [], load.failures


@pytest.mark.slow
def test_scale_2_3_2_loses_no_request(model_dir, expected):
    model = str(model_dir)
    eplb = {"window_size": 8, "step_interval": 1000, "num_redundant_experts": 2}
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    # the cpu platform has 4 devices; the new rank of the third scale dies as experts move, those of the fourth
    # as they start
    env = {"EPPLAT_CPU_OMP_THREADS_BIND": "|".join([cores] * 4), "EPPLAT_ELASTIC_KILL_AT": "exchange:3,start:4"}
    with Server(model, "--dtype", "float32", "-dp", "2", "-ep", "--enable-elastic-ep", "--enable-eplb",
                "--eplb-config", json.dumps(eplb), "--max-model-len", "1024", "--max-num-seqs", "8",
                "--distributed-timeout-seconds", "60", env=env) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=180)
        with cf.ThreadPoolExecutor(3) as pool:
            assert _batch(client, model, pool) == expected[0]
        seeded = client.completions.create(model=model, prompt=STREAM_PROMPT, max_tokens=STREAM_TOKENS,
                                           **SEEDED).choices[0].text
        # bad bodies and impossible sizes: 400, the size unchanged
        for body, needle in ((b"{not json", "Invalid JSON format"), ({}, "new_data_parallel_size is required"),
                             ({"new_data_parallel_size": 0}, "positive integer"),
                             ({"new_data_parallel_size": "3"}, "positive integer"),
                             ({"new_data_parallel_size": 3, "drain_timeout": -1}, "drain_timeout"),
                             ({"new_data_parallel_size": 1}, "cannot hold the model's 8 experts"),
                             ({"new_data_parallel_size": 5}, "5 engine processes on this node (DP ranks x "
                              "--tensor-parallel-size) but the cpu platform has 4 devices here")):
            r = _scale(s.url, body)
            assert r.status_code == 400 and needle in r.json()["error"]["message"], (body, r.text)
        assert httpx.post(s.url + "/is_scaling_elastic_ep").json() == {"is_scaling_elastic_ep": False}

        # up: 2 -> 3 under load
        _scale_with_traffic(s, client, model, expected, 3)
        assert httpx.post(s.url + "/is_scaling_elastic_ep").json() == {"is_scaling_elastic_ep": False}
        log = s.output()
        assert "EP rank 2/3 holds physical experts 10-14 of 15" in log
        assert re.search(r"elastic EP: 2 -> 3 DP ranks \(world generation 1\): \d+ expert moves", log)
        per_rank = _requests_per_rank(s.url)
        assert per_rank["size"] == 3 and per_rank.get("2", 0) > 0, per_rank    # the new rank was routed to
        assert per_rank["up"] == 1 and "down" not in per_rank, per_rank

        # a drain that cannot finish (requests with a grammar do not move): 408, and the three ranks keep
        # serving; with 16 streams in flight (what the two staying ranks run at once: 2 x --max-num-seqs 8),
        # requests sent while it runs get 503 with Retry-After, and are served when sent again after the scale;
        # a second scale meanwhile gets 409, and /health answers
        slow = [_Stream(client, model, max_tokens=1000, sampling=GRAMMAR) for _ in range(16)]   # some on rank 2
        box = {}
        t = threading.Thread(target=lambda: box.setdefault(
            "r", _scale(s.url, {"new_data_parallel_size": 2, "drain_timeout": 3})))
        t.start()
        while not httpx.post(s.url + "/is_scaling_elastic_ep").json()["is_scaling_elastic_ep"]:
            assert t.is_alive(), "the scale ended before /is_scaling_elastic_ep said it ran"
            time.sleep(0.01)
        bodies = [{"model": model, "prompt": p, "max_tokens": SHORT, "temperature": 0, "ignore_eos": True}
                  for p in POOL[:3]]
        refused = [httpx.post(s.url + "/v1/completions", json=body, timeout=60) for body in bodies]
        second = _scale(s.url, {"new_data_parallel_size": 4})
        assert second.status_code == 409 and "A scale is already running" in second.text, second.text
        assert httpx.get(s.url + "/health").status_code == 200
        t.join(60)
        r = box["r"]
        assert r.status_code == 408 and "drain timeout after 3 seconds" in r.json()["error"]["message"], r.text
        for answer in refused:
            assert answer.status_code == 503, answer.text
            assert int(answer.headers["retry-after"]) >= 1
            assert "A scale of the data parallel engines is running" in answer.json()["error"]["message"]
        for st in slow:
            st.cancelled.set()
            st.result()
        again = [httpx.post(s.url + "/v1/completions", json=body, timeout=60) for body in bodies]
        assert [a.json()["choices"][0]["text"] for a in again] == expected[0][:3]
        before = _requests_per_rank(s.url).get("2", 0)
        with cf.ThreadPoolExecutor(3) as pool:
            for _ in range(5):      # until rank 2's reported queue (its engine stats) no longer holds the cancelled
                assert _batch(client, model, pool) == expected[0]
                if _requests_per_rank(s.url).get("2", 0) > before:
                    break
            else:
                raise AssertionError("rank 2 got no request after the 408")

        # down: 3 -> 2 under load, rank 2's streams (a greedy and a seeded one) moving to ranks 0 and 1
        _scale_with_traffic(s, client, model, expected, 2, seeded=seeded)
        assert re.search(r"elastic EP: 3 -> 2 DP ranks \(world generation 2\)", s.output())
        assert "DP rank 2 handed its experts over and leaves" in s.output()
        per_rank = _requests_per_rank(s.url)
        assert per_rank["size"] == 2 and "2" not in per_rank and per_rank["down"] == 1, per_rank

        # the new rank dies in the expert exchange (EPPLAT_ELASTIC_KILL_AT): 500, the two ranks form their
        # world again, and every request sent before, during and after is served with the oracle's tokens
        _scale_with_traffic(s, client, model, expected, 3, status=500, message="still 2 data parallel engines")
        log = s.output()
        assert "EPPLAT_ELASTIC_KILL_AT=exchange:3: rank killed at exchange" in log
        assert "elastic EP: rank 0 is back in its world of 2 DP ranks" in log
        assert "elastic EP: rank 1 is back in its world of 2 DP ranks" in log
        assert _requests_per_rank(s.url)["size"] == 2

        # the new ranks killed while they start (EPPLAT_ELASTIC_KILL_AT: SIGKILL once their model and KV cache
        # are ready, before their ready line): 500, and the server serves at the old size
        r = _scale(s.url, {"new_data_parallel_size": 4})
        assert r.status_code == 500 and "a new engine did not start" in r.text, r.text
        assert "EPPLAT_ELASTIC_KILL_AT=start:4: rank killed at start" in s.output()
        assert "still 2 data parallel engines" in r.json()["error"]["message"]
        assert httpx.get(s.url + "/health").status_code == 200
        with cf.ThreadPoolExecutor(3) as pool:
            assert _batch(client, model, pool) == expected[0]


@pytest.mark.slow
def test_tp2_ranks_join_and_leave_with_their_tp_group(model_dir, expected):
    """DP x TP: DP 1 -> 2 -> 1 at TP 2 (EP 2 -> 4 -> 2), each DP rank's two processes joining and leaving
    together (up under the same traffic as above); every answer is transformers'."""
    model = str(model_dir)
    with Server(model, "--dtype", "float32", "-tp", "2", "-ep", "--enable-elastic-ep", "--enable-eplb",
                "--eplb-config", json.dumps({"window_size": 8, "step_interval": 1000}), "--max-model-len", "1024",
                "--max-num-seqs", "8", "--distributed-timeout-seconds", "60") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=180)
        _scale_with_traffic(s, client, model, expected, 2)
        log = s.output()
        assert "EP rank 3/4 holds physical experts 12-15 of 16" in log, log[-3000:]
        assert re.search(r"elastic EP: 1 -> 2 DP ranks \(world generation 1\): \d+ expert moves", log)
        assert _requests_per_rank(s.url).get("1", 0) > 0        # the new DP rank was routed to
        streams = [_Stream(client, model) for _ in range(2)]      # one on each DP rank: rank 1's moves
        r = _scale(s.url, {"new_data_parallel_size": 1})
        done = time.monotonic()
        assert r.status_code == 200, r.text
        assert [st.result() for st in streams] == [expected[1]] * 2
        assert min(st.last for st in streams) > done, "the scale-down waited for the streams"
        assert "elastic EP: 1 requests moved off the departing DP ranks [1]" in s.output()
        with cf.ThreadPoolExecutor(3) as pool:
            assert _batch(client, model, pool) == expected[0]
        log = s.output()
        assert "DP rank 1 TP rank 1 handed its experts over and leaves" in log
        assert "DP rank 1 TP rank 0 handed its experts over and leaves" in log
        assert _requests_per_rank(s.url)["size"] == 1


def _client(s: Server):
    return openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=180)


def _wait_for(s: Server, pattern: str, timeout: float = 120) -> float:
    """When ``pattern`` (a regular expression) showed in the server's log."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, s.output()):
        assert time.monotonic() < deadline, (pattern, s.output()[-3000:])
        time.sleep(0.02)
    return time.monotonic()


def _re_form_under_traffic(head: Server, servers, model, expected, change, start, done=None) -> None:
    """``start()`` (a join or a leave) while batches and a stream run on each of ``servers``; once rank 0 (on
    ``head``) logs that ``change`` ("server 2 joins ...") begins, one more stream each; then ``done()`` (the
    joiner up, the leaver gone). Every answer is transformers', and the later streams end after the re-forming."""
    traffic = [(_Load(_client(s), model, expected[0]), _Stream(_client(s), model)) for s in servers]
    start()
    _wait_for(head, "elastic EP: server " + re.escape(change))
    across = [_Stream(_client(s), model) for s in servers]
    sizes = re.search(r"\d+ -> \d+ DP ranks \(world generation \d+\)", change).group(0)
    formed = _wait_for(head, rf"elastic EP: {re.escape(sizes)}: \d+ expert moves")
    if done is not None:
        done()
    for load, stream in traffic:
        rounds = load.rounds
        while load.rounds < rounds + 1 and load.thread.is_alive():    # a batch after the re-forming
            time.sleep(0.05)
        load.stop()
        assert load.failures == [], load.failures
        assert stream.result() == expected[1]
    for st in across:
        assert st.result() == expected[1]
        assert st.last > formed, "the stream started as the group re-formed ended before it had re-formed"


@pytest.mark.slow
def test_a_server_joins_and_one_stopped_with_sigterm_leaves(model_dir, expected):
    """External load balancing on loopback: servers 0 and 1 form the group, server 2 joins it, server 1 is
    stopped with SIGTERM and leaves (server 2 becomes DP rank 1); batches and streams on the others throughout."""
    model = str(model_dir)
    port = free_ports((0, 1, 2, *range(10, 16)))     # the store, the wake channel, three servers' engine sockets
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
        joiner = threading.Thread(target=lambda: servers.setdefault(2, Server(
            model, *common, "--data-parallel-size", "3", "--data-parallel-rank", "2", env=env)))
        _re_form_under_traffic(s0, [s0, s1], model, expected, r"2 joins the group: 2 -> 3 DP ranks (world generation 1)",
                               joiner.start, lambda: joiner.join(180))
        s2 = servers[2]
        log2 = s2.output()
        assert "EP rank 2/3 holds physical experts 10-14 of 15" in log2
        assert "joining the running group as DP rank 2 of 3 (world generation 1)" in log2
        with cf.ThreadPoolExecutor(3) as pool:
            assert _batch(_client(s2), model, pool) == expected[0]

        # leave: server 1 (DP rank 1 of 3) gets SIGTERM; server 2 becomes DP rank 1
        def gone():
            assert s1.proc.wait(120) == 0, s1.output()[-3000:]
        _re_form_under_traffic(s0, [s0, s2], model, expected, "1 leaves the group: 3 -> 2 DP ranks (world generation 2)",
                               lambda: os.killpg(s1.proc.pid, signal.SIGTERM), gone)
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


@pytest.mark.parametrize("args, needle", [
    ((), "--enable-elastic-ep scales expert-parallel DP ranks: add --enable-expert-parallel"),
    (("-ep", "--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'),
     "--enable-elastic-ep does not run with --speculative-config or --kv-transfer-config yet"),
    (("-ep", "--headless", "--data-parallel-address", "127.0.0.1"),
     "--enable-elastic-ep places new ranks on other nodes through Ray, not on headless nodes: run every rank from "
     "one launcher with --data-parallel-backend ray (Ray places them on the cluster's nodes), or each with its own "
     "server (--data-parallel-rank), which joins and leaves the group"),
])
def test_elastic_ep_flag_errors_are_one_line(model_dir, args, needle):
    out = subprocess.run([sys.executable, "-m", "epplat.cli", "serve", str(model_dir), "-dp", "2",
                          "--enable-elastic-ep", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == f"epplat serve: error: {needle}"


def test_more_engine_processes_than_devices_is_one_line(model_dir):
    """The cpu platform's devices are the core sets of EPPLAT_CPU_OMP_THREADS_BIND: DP 2 on one is refused."""
    env = {**os.environ, "EPPLAT_CPU_OMP_THREADS_BIND": str(min(os.sched_getaffinity(0)))}
    out = subprocess.run([sys.executable, "-m", "epplat.cli", "serve", str(model_dir), "-dp", "2", "-ep",
                          "--enable-elastic-ep"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == ("epplat serve: error: 2 engine processes on this node (DP ranks "
                                                   "x --tensor-parallel-size) but the cpu platform has 1 devices here")


def _rendezvous_rank(rank: int, ipc_dir: str, out) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from epplat.config import ParallelConfig
    from epplat.core.distributed.elastic_world import JoinAborted, rendezvous
    par = ParallelConfig(ipc_dir=ipc_dir, enable_expert_parallel=True)
    dist.init_process_group("gloo", init_method=f"file://{ipc_dir}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        rendezvous(par, rank, 1, 3, dist.group.WORLD, timeout=1.0)   # the third rank never comes
        out.put((rank, "joined"))
    except JoinAborted as e:
        t = torch.tensor([rank + 1])
        dist.all_reduce(t)                       # the world they were serving in still works
        out.put((rank, f"{e} / old world sum {int(t)}"))


def test_join_of_a_missing_rank_aborts_on_every_running_rank(tmp_path):
    """A new rank that never checks in (it died after starting): the running ranks all give the scale up
    together, with their world intact (core_proc then answers the scale call with this error)."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rendezvous_rank, args=(r, str(tmp_path), out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert results == {r: "2 of 3 ranks joined world generation 1 within 1 s / old world sum 3" for r in range(2)}
