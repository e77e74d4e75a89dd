"""Prefix caching: block names chained over token ids, the longest cached prefix reused, LRU
eviction of freed named blocks, and greedy tokens equal to transformers' with hits, chunked
prefill, eviction and preemption, and with the cache off; the hit counters in /metrics and the log."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from epplat.core.engine.block_manager import BlockManager, block_hash
from epplat.core.engine.protocol import EngineRequest, SamplingParams
from epplat.core.engine.request import Request
from hf_oracle import hf_greedy
from server_utils import Server
from test_engine import greedy, make_core, run


def req(ids, rid="r"):
    return Request(EngineRequest(rid, list(ids), SamplingParams()))


def admit(bm, r):
    hit = bm.cached_prefix(r)
    assert bm.admit(r, hit, r.num_tokens - len(hit) * bm.block_size)
    r.num_computed = r.num_tokens
    bm.cache_full_blocks(r)
    return hit


def test_names_chain_over_the_prefix():
    bm = BlockManager(8, 4)
    a, b = req([1, 2, 3, 4, 5, 6, 7, 8, 9]), req([9, 2, 3, 4, 5, 6, 7, 8, 9])
    na, nb = bm.names(a), bm.names(b)
    assert len(na) == 2                      # the partial third block has no name
    assert na[0] != nb[0] and na[1] != nb[1]  # same tokens in block 1, different parent
    assert na[1] == block_hash(block_hash(b"", [1, 2, 3, 4]), [5, 6, 7, 8])


def test_longest_prefix_reused_and_last_token_always_computed():
    bm = BlockManager(8, 4)
    first = req(range(1, 11), "a")          # 10 tokens: blocks 0, 1 full
    assert admit(bm, first) == []
    blocks_a = list(first.block_table)
    second = req([*range(1, 9), 50, 51, 52], "b")   # shares 2 full blocks
    assert admit(bm, second) == blocks_a[:2]
    assert second.num_cached_tokens == 8 and bm.refs[blocks_a[0]] == 2
    same = req(range(1, 9), "c")              # exactly the two cached blocks: the last token is recomputed
    assert bm.cached_prefix(same) == blocks_a[:1]
    assert bm.queries == 21 and bm.hits == 8
    for r in (first, second):
        bm.release(r)
    assert bm.num_free == 8


def test_freed_named_blocks_stay_until_evicted_least_recently_freed_first():
    bm = BlockManager(6, 2)
    a = req([1, 2, 3, 4], "a")   # 2 named blocks
    b = req([5, 6, 7, 8], "b")
    admit(bm, a)
    admit(bm, b)
    bm.release(a)
    bm.release(b)
    assert bm.num_free == 6 and bm.usage == 0.0
    # two unnamed blocks are handed out before any named one is evicted
    c = req([9, 10, 11, 12], "c")
    admit(bm, c)
    assert bm.cached_prefix(req([1, 2, 3, 4, 0])) and bm.cached_prefix(req([5, 6, 7, 8, 0]))
    bm.release(c)
    # now every free block is named: a new prompt evicts a's blocks (freed first), tail before head
    d = req([20], "d")                     # one block
    admit(bm, d)
    assert len(bm.cached_prefix(req([1, 2, 3, 4, 0]))) == 1      # a's second block went first
    assert len(bm.cached_prefix(req([5, 6, 7, 8, 0]))) == 2
    bm.release(d)
    assert bm.num_free == 6


def test_off_finds_nothing():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    admit(bm, req(range(1, 11), "a"))
    assert bm.cached_prefix(req(range(1, 11), "b")) == [] and bm.queries == 0


SHARED = [(7 * i + 3) % 1900 + 10 for i in range(40)]        # 2.5 blocks of 16


@pytest.mark.parametrize("budget", [2048, 7])
def test_greedy_tokens_unchanged_by_cached_prefixes(qwen3_moe_dir, budget):
    prompts = [SHARED + [11, 12, 13], SHARED + [500], SHARED[:32], SHARED[:33] + [7] * 20, SHARED + [11, 12, 13]]
    want = hf_greedy(qwen3_moe_dir, prompts, 6, ignore_eos=True)
    core = make_core(qwen3_moe_dir, budget=budget)
    first, _ = run(core, prompts[:1], [greedy(6)])
    assert core.blocks.hits == 0
    got, _ = run(core, prompts[1:], [greedy(6)] * 4)
    assert [first[0], *got] == want
    # 2 blocks each, but 1 for the 32-token prompt (its last token is computed, to sample from)
    assert core.blocks.hits == 16 * (2 + 1 + 2 + 2)
    assert core.blocks.num_free == core.num_blocks


def test_eviction_and_preemption_keep_tokens(qwen3_moe_dir):
    # 12 blocks of 4 tokens and prompts sharing a 2-block prefix: cached blocks are evicted and requests preempted
    core = make_core(qwen3_moe_dir, blocks=12, block_size=4, max_len=48)
    prompts = [[9, 8, 7, 6, 5, 4, 3, 2, i + 1, 2 * i + 3] for i in range(8)]
    got, _ = run(core, prompts, [greedy(14)] * len(prompts))
    assert core.scheduler.num_preemptions > 0 and core.blocks.hits > 0
    assert got == hf_greedy(qwen3_moe_dir, prompts, 14, ignore_eos=True)
    assert core.blocks.num_free == core.num_blocks


def test_flag_turns_it_off_and_tokens_stay(qwen3_moe_dir):
    from epplat.cli import build_parser
    from epplat.core.engine.core import EngineCore
    from epplat.platforms.cpu.platform import CpuPlatform
    from epplat.serve import engine_config_from_args
    on = engine_config_from_args(build_parser().parse_args(["serve", str(qwen3_moe_dir)]))
    args = build_parser().parse_args(["serve", str(qwen3_moe_dir), "--no-enable-prefix-caching", "--dtype",
                                      "float32", "--kv-cache-memory-bytes", "64000000"])
    cfg = engine_config_from_args(args)
    assert on.cache.enable_prefix_caching and not cfg.cache.enable_prefix_caching
    core = EngineCore(cfg, CpuPlatform(), torch.device("cpu"))
    prompts = [SHARED + [11], SHARED + [11]]
    got, _ = run(core, prompts[:1], [greedy(4)])
    got += run(core, prompts[1:], [greedy(4)])[0]
    assert got == hf_greedy(qwen3_moe_dir, prompts, 4, ignore_eos=True)
    assert core.blocks.hits == core.blocks.queries == 0 and core.blocks.num_free == core.num_blocks


def test_server_counts_hits_in_metrics_and_log(qwen3_moe_dir):
    prompts = [SHARED + [11, 12], SHARED + [13]]
    want = hf_greedy(qwen3_moe_dir, prompts, 4, ignore_eos=True)
    with Server(str(qwen3_moe_dir), "--dtype", "float32", "--max-model-len", "256",
                env={"EPPLAT_LOG_STATS_INTERVAL": "0"}) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        got = [client.completions.create(model=str(qwen3_moe_dir), prompt=p, max_tokens=4, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0] for p in prompts]
        text = httpx.get(s.url + "/metrics").text
        log = s.output()
    tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    assert [c.text for c in got] == [tok.decode(w, skip_special_tokens=True) for w in want]
    series = {m.name: sum(x.value for x in m.samples) for m in text_string_to_metric_families(text)}
    assert series["vllm:prefix_cache_queries"] == 42 + 41, text
    assert series["vllm:prefix_cache_hits"] == 32
    rates = re.findall(r"Prefix cache hit rate: ([0-9.]+)%", log)
    assert rates and rates[-1] == f"{100 * 32 / 83:.1f}", log
