"""`epplat` command line: bad values are one clear line and a non-zero exit; plugins listing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import cli_cases
from plugin_listing import plugin_statuses


def epplat(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "epplat.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env} if env else None)


def test_bad_flag_values_are_one_line():
    cases = [
        (["serve", "MODEL", "--port", "99999"], "--port"),
        (["serve", "MODEL", "--dtype", "float8"], "--dtype"),
        (["serve", "MODEL", "--max-num-seqs", "zero"], "--max-num-seqs"),
        (["serve", "MODEL", "--block-size", "3"], "--block-size"),
        (["serve", "MODEL", "--bogus-flag"], "--bogus-flag"),
        (["serve", "MODEL", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    ]
    for (args, needle), r in zip(cases, cli_cases.run([a for a, _ in cases])):
        lines = r.output.strip().splitlines()
        assert r.returncode not in (0, None), (args, r)
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.output, (args, r.output)


def test_bad_choices_after_parsing_are_one_line(qwen3_moe_dir, tmp_path):
    cases = [
        (["serve", str(tmp_path / "nope")], "not a local directory"),
        (["serve", str(qwen3_moe_dir), "--platform", "tpu"], "unknown --platform 'tpu'; available: ascend, cpu, cuda"),
        (["serve", str(qwen3_moe_dir), "--platform", "ascend"], "torch_npu not installed"),
        (["serve", str(qwen3_moe_dir), "--all2all-backend", "nope"], "available: "),
        (["serve", str(qwen3_moe_dir), "--quantization", "fp8"], "--quantization fp8 on cpu serves fp8 checkpoints"),
        (["serve", str(qwen3_moe_dir), "--quantization", "int3"], "unknown --quantization 'int3'"),
        (["serve", str(qwen3_moe_dir), "--max-model-len", "100000"], "max_position_embeddings"),
    ]
    for (args, needle), r in zip(cases, cli_cases.run([a for a, _ in cases])):
        cli_cases.assert_one_error_line(r, needle, args)


def test_plugins_lists_every_kind_with_package_and_usability():
    r = epplat("plugins")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for title in ("platforms:", "all2all backends:", "graph runners:", "quantization methods:",
                  "KV connectors:", "EPLB policies:"):
        assert title in out
    st = plugin_statuses(out)
    assert st["cpu"] == ("epplat", "usable")
    assert st["ascend"][1].startswith("unusable: torch_npu not installed")
    import torch
    if not torch.cuda.is_available():
        assert st["cuda"][1] in ("unusable: no CUDA device visible", "unusable: torch built without CUDA")
    assert st["allgather_reducescatter"][1] == "usable" and st["naive"][1] == "usable"
    assert st["eager"][1] == "usable"
    assert st["pplx"][1] == "unusable: epplat's adapter for pplx_kernels is not written yet"


def test_checkpoint_missing_a_tensor_is_one_error_line(mixtral_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(mixtral_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    r = epplat("serve", str(broken), "--port", "0")
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert r.returncode == 1 and errors == [errors[0]] and "lacks 1 tensors" in errors[0], r.stderr
    assert "layers.1.mlp.experts.3.down" in errors[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("flags, needle", [
    (["-dp", "3", "-ep", "--enable-eplb"], "8 experts do not divide over EP size 3"),   # EPLB: even counts
    (["-tp", "3"], "do not divide over --tensor-parallel-size 3"),
    (["-dp", "2", "--data-parallel-start-rank", "1", "--data-parallel-address", "127.0.0.1"], "runs --headless"),
    (["-dp", "2", "--data-parallel-size-local", "1"], "need --data-parallel-address"),
    (["-dp", "2", "--data-parallel-rank", "2", "--data-parallel-address", "127.0.0.1"], "must be below"),
    (["--headless", "--api-server-count", "2", "-dp", "2", "--data-parallel-address", "x"], "drop --api-server-count"),
    (["-dp", "2", "--data-parallel-size-local", "1", "--data-parallel-address", "10.0.0.1"], "need a shared secret"),
])
def test_bad_parallel_layouts_are_one_line(qwen3_moe_dir, flags, needle):
    r = epplat("serve", str(qwen3_moe_dir), *flags, env={"EPPLAT_INTERNAL_SECRET": ""})
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert r.returncode != 0 and len(errors) == 1 and needle in errors[0], r.stderr


def test_multi_node_rules_hold_for_a_config_built_in_python():
    """The address and secret rules live in ParallelConfig, not in serve's flag parsing."""
    from epplat.config import ConfigError, ParallelConfig
    with pytest.raises(ConfigError, match="need --data-parallel-address"):
        ParallelConfig(data_parallel_size=2, data_parallel_size_local=1, internal_secret="s")
    with pytest.raises(ConfigError, match="need a shared secret"):
        ParallelConfig(data_parallel_size=2, data_parallel_size_local=1, data_parallel_address="10.0.0.1")
    one = ParallelConfig(data_parallel_size=2)
    assert one.data_parallel_address == "127.0.0.1" and len(one.internal_secret) == 64    # one node: its own secret
