"""Shared fixtures: small random-weight checkpoints made with `epplat make-model`, and the
transformers oracle (``hf_greedy``) that engine tests compare greedy tokens with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="session")
def install_example(tmp_path_factory):
    """``install_example("epplat-example-platform", ...)``: those examples/ packages pip-installed (no deps)
    into a directory of their own; returns the environment that puts it on PYTHONPATH. The test
    environment itself is left as it was."""
    def install(*names: str) -> dict:
        target = tmp_path_factory.mktemp("site")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), *(str(EXAMPLES / n) for n in names)], check=True)
        return {"PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    return install


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory):
    from epplat.tools.make_model import make_model
    # two shards, to exercise model.safetensors.index.json
    return make_model("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"), layers=2, hidden=64, experts=8, top_k=2,
                      heads=4, kv_heads=2, head_dim=32, moe_intermediate=64, vocab_size=2048, seed=1,
                      max_shard_bytes=1_200_000)


@pytest.fixture(scope="session")
def skewed_dir(tmp_path_factory):
    """A Qwen3-MoE checkpoint whose router is skewed on purpose (EPLB has load to balance)."""
    from epplat.tools.make_model import make_model
    return make_model("qwen3_moe", tmp_path_factory.mktemp("skewed"), layers=2, hidden=64, experts=8, top_k=2,
                      heads=4, kv_heads=2, head_dim=32, moe_intermediate=64, vocab_size=2048, seed=5,
                      router_skew=1.5)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    from epplat.tools.make_model import make_model
    return make_model("mixtral", tmp_path_factory.mktemp("mixtral"), layers=2, hidden=64, experts=8, top_k=2,
                      heads=4, kv_heads=2, head_dim=16, moe_intermediate=96, vocab_size=2048, seed=2)
