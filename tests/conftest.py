"""Shared fixtures: small random-weight checkpoints made with `epplat make-model`, and the
transformers oracle (``hf_greedy``) that engine tests compare greedy tokens with."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hf_oracle import hf_greedy  # noqa: E402,F401  (tests import it from hf_oracle or use it from here)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a multi-process layout test of 30 s or more on 2 cores; in the "
                                       "default run (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory):
    from epplat.core.model.make_model import make_model
    # two shards, to exercise model.safetensors.index.json
    return make_model("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"), layers=2, hidden=64, experts=8, top_k=2,
                      heads=4, kv_heads=2, head_dim=32, moe_intermediate=64, vocab_size=2048, seed=1,
                      max_shard_bytes=1_200_000)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    from epplat.core.model.make_model import make_model
    return make_model("mixtral", tmp_path_factory.mktemp("mixtral"), layers=2, hidden=64, experts=8, top_k=2,
                      heads=4, kv_heads=2, head_dim=16, moe_intermediate=96, vocab_size=2048, seed=2)
