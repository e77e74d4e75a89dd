"""`epplat make-model` checkpoints load in transformers; tokenizer and demo model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_transformers_loads_every_tensor(arch, request):
    from transformers import AutoModelForCausalLM
    model_dir = request.getfixturevalue(f"{arch}_dir")
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    experts = getattr(model.config, "num_experts", None) or model.config.num_local_experts
    assert experts == 8


def test_sharded_index_lists_every_tensor(qwen3_moe_dir):
    from safetensors import safe_open
    index = json.loads((qwen3_moe_dir / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 2
    names = set()
    for f in files:
        with safe_open(str(qwen3_moe_dir / f), "pt") as st:
            names |= set(st.keys())
    assert names == set(index["weight_map"])
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names


def test_tokenizer_round_trips_and_has_a_chat_template(qwen3_moe_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    assert len(tok) == 2048
    for s in ("hello world", "def f(x):\n    return x * 2", "naïve café ünïcode 你好"):
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_weights_do_not_depend_on_sharding(tmp_path):
    from safetensors.torch import load_file

    from epplat.core.model.make_model import make_model
    a = make_model("mixtral", tmp_path / "a", layers=1, hidden=32, experts=2, heads=2, kv_heads=1, head_dim=16)
    b = make_model("mixtral", tmp_path / "b", layers=1, hidden=32, experts=2, heads=2, kv_heads=1, head_dim=16,
                   max_shard_bytes=50_000)
    one = load_file(str(a / "model.safetensors"))
    many = {}
    for f in sorted(b.glob("model-*.safetensors")):
        many.update(load_file(str(f)))
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_demo_model_is_made_once_and_reused(tmp_path, monkeypatch):
    from epplat.core.model import demo
    monkeypatch.setenv("EPPLAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(demo, "DEMO_SHAPE", dict(layers=1, hidden=32, experts=4, top_k=2, heads=2, kv_heads=1,
                                                 head_dim=16, vocab_size=2048))
    first = demo.demo_model_path()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert demo.demo_model_path() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [demo.DEMO_VERSION]   # no temp dirs left behind


def test_make_model_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "epplat.cli", "make-model", "llama", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "arch" in r.stderr
    r = subprocess.run([sys.executable, "-m", "epplat.cli", "make-model", "mixtral", str(tmp_path), "--top-k", "9"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "epplat make-model: error: need top_k <= experts and heads divisible by kv_heads"]
