"""`epplat make-model` checkpoints load in transformers; tokenizer, sharding, demo model and CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hf_oracle import hf_greedy

PROMPTS = [[5, 17, 99, 230, 7, 64], [400, 401, 402], [77] * 6, [3]]


def _load(model_dir, **kw):
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True, **kw)
    assert not any(info.values()), info
    return model


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_transformers_loads_every_tensor_and_generates_varied_tokens(arch, request):
    model_dir = request.getfixturevalue(f"{arch}_dir")
    model = _load(model_dir)
    assert type(model).__name__ == {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}[arch]
    assert (getattr(model.config, "num_experts", None) or model.config.num_local_experts) == 8
    assert model.config.rope_parameters["rope_theta"] == 1e6
    outs = hf_greedy(model_dir, PROMPTS, 12, ignore_eos=True)
    assert all(len(o) == 12 for o in outs)
    assert len({t for o in outs for t in o}) > 24, outs            # not one token over and over
    assert len({tuple(o) for o in outs}) == len(outs)


def test_sharded_index_lists_every_tensor(qwen3_moe_dir):
    from safetensors import safe_open
    index = json.loads((qwen3_moe_dir / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert files == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert not (qwen3_moe_dir / "model.safetensors").exists()
    names, total = set(), 0
    for f in files:
        with safe_open(str(qwen3_moe_dir / f), "pt") as st:
            for k in st.keys():
                assert index["weight_map"][k] == f
                names.add(k)
                total += st.get_tensor(k).nbytes
    assert names == set(index["weight_map"]) and total == index["metadata"]["total_size"]
    for name in ("model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.0.mlp.gate.weight",
                 "model.layers.0.self_attn.q_norm.weight", "lm_head.weight"):
        assert name in names


def test_mixtral_hub_names_and_config(mixtral_dir):
    from safetensors import safe_open
    with safe_open(str(mixtral_dir / "model.safetensors"), "pt") as st:
        names = set(st.keys())
    assert {"model.layers.1.block_sparse_moe.experts.7.w1.weight", "model.layers.1.block_sparse_moe.experts.7.w2.weight",
            "model.layers.1.block_sparse_moe.experts.7.w3.weight", "model.layers.1.block_sparse_moe.gate.weight"} <= names
    cfg = json.loads((mixtral_dir / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 2)


def test_tokenizer_round_trips_and_has_a_chat_template(qwen3_moe_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    assert len(tok) == 2048 and tok.bos_token is None
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    for s in ("hello world", "def f(x):\n    return x * 2\n", "naïve café ünïcode 你好 🤖", "  two  spaces  ", ""):
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    assert tok.encode("<|im_start|>user", add_special_tokens=False)[0] == 1
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert not tok.apply_chat_template(msgs[:2], tokenize=False).endswith("assistant\n")


def test_tokenizer_is_deterministic():
    from epplat.tools.tokenizer_gen import build_tokenizer
    assert build_tokenizer(600).to_str() == build_tokenizer(600).to_str()


def test_weights_do_not_depend_on_sharding(tmp_path):
    from safetensors.torch import load_file

    from epplat.tools.make_model import make_model
    kw = dict(layers=1, hidden=32, experts=2, heads=2, kv_heads=1, head_dim=16, vocab_size=512)
    a = make_model("mixtral", tmp_path / "a", **kw)
    b = make_model("mixtral", tmp_path / "b", max_shard_bytes=50_000, workers=3, **kw)
    one = load_file(str(a / "model.safetensors"))
    many = {}
    for f in sorted(b.glob("model-*.safetensors")):
        many.update(load_file(str(f)))
    assert len(list(b.glob("model-*.safetensors"))) > 2
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)
    make_model("mixtral", tmp_path / "b", **kw)       # re-made as one file: no stale shards left
    assert sorted(p.name for p in b.glob("model*")) == ["model.safetensors"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes_and_odd_head_dim(tmp_path, dtype):
    from safetensors import safe_open

    from epplat.tools.make_model import make_model
    d = make_model("mixtral", tmp_path, layers=1, hidden=64, experts=4, heads=4, kv_heads=2, head_dim=32,
                   vocab_size=512, dtype=dtype)               # head_dim != hidden / heads
    with safe_open(str(d / "model.safetensors"), "pt") as st:
        assert st.get_tensor("lm_head.weight").dtype == getattr(torch, dtype)
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == dtype
    model = _load(d)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (128, 64)


def test_demo_model_is_made_once_and_reused(tmp_path, monkeypatch):
    from epplat.tools import demo
    monkeypatch.setenv("EPPLAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(demo, "DEMO_SHAPE", dict(layers=1, hidden=32, experts=4, top_k=2, heads=2, kv_heads=1,
                                                 head_dim=16, vocab_size=2048))
    first = demo.demo_model_path()
    assert first == tmp_path / demo.DEMO_VERSION
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert demo.demo_model_path() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [demo.DEMO_VERSION]   # no temp dirs left behind


def test_make_model_cli(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "epplat.cli", "make-model", *args], capture_output=True, text=True)
    r = cli("qwen3_moe", str(tmp_path / "m"), "--layers", "1", "--hidden", "32", "--experts", "4", "--heads", "2",
            "--kv-heads", "1", "--head-dim", "16", "--vocab-size", "512", "--max-shard-size", "100KB")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "m") and (tmp_path / "m" / "model.safetensors.index.json").is_file()
    for args, needle in ((["llama", str(tmp_path)], "invalid choice: 'llama'"),
                         (["mixtral", str(tmp_path), "--layers", "0"], "--layers: '0' must be a positive integer"),
                         (["mixtral", str(tmp_path), "--max-shard-size", "lots"], "not a size"),
                         (["mixtral", str(tmp_path), "--top-k", "9"], "need top_k <= experts")):
        r = cli(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
