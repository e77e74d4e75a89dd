"""Shared fixtures: small random-weight checkpoints made with `epplat make-model`, and the
transformers oracle (``hf_greedy``) that engine tests compare greedy tokens with."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

import simulations  # noqa: E402
from hf_oracle import hf_greedy  # noqa: E402,F401  (tests import it from hf_oracle or use it from here)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a multi-process layout test of 30 s or more on 2 cores; in the "
                                       "default run (deselect with -m 'not slow')")


@pytest.fixture
def simulation(monkeypatch):
    """``simulation("npu")`` puts that simulated library (tests/simulations) on ``sys.path`` for this
    test, and so in the workers it spawns, and returns the environment for its subprocesses."""
    def use(name: str) -> dict:
        monkeypatch.syspath_prepend(simulations.path(name))
        return simulations.env(name)
    return use


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory):
    from epplat.tools.make_model import make_model
    # two shards, to exercise model.safetensors.index.json
    return make_model("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"), layers=2, hidden=64, experts=8, top_k=2,
                      heads=4, kv_heads=2, head_dim=32, moe_intermediate=64, vocab_size=2048, seed=1,
                      max_shard_bytes=1_200_000)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    from epplat.tools.make_model import make_model
    return make_model("mixtral", tmp_path_factory.mktemp("mixtral"), layers=2, hidden=64, experts=8, top_k=2,
                      heads=4, kv_heads=2, head_dim=16, moe_intermediate=96, vocab_size=2048, seed=2)
