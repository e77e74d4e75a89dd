"""Plugins: the registry from entry points, and a third-party package installed with pip."""

from __future__ import annotations

import os
import subprocess
import sys

import openai
import pytest

from epplat.plugins import PluginError, registry
from hf_oracle import hf_greedy
from plugin_listing import plugin_statuses
from server_utils import Server


def test_builtin_registrations_come_from_entry_points():
    reg = registry()
    assert {"cpu", "cuda", "ascend"} <= set(reg.names("platform"))
    assert {"allgather_reducescatter", "naive"} <= set(reg.names("all2all"))
    assert reg.by_kind["platform"]["cpu"].plugin == "epplat"
    assert reg.pick_platform("auto") in reg.names("platform")


def test_platforms_say_when_they_run_a_slower_path():
    """What ModelRunner logs once at startup: the cpu kernels decline half precision; cuda without
    Triton runs torch ops. (Constructing CudaPlatform needs no GPU.)"""
    import importlib.util

    import torch

    from epplat.platforms.cpu import cpu_kernels
    from epplat.platforms.cpu.platform import CpuPlatform
    from epplat.platforms.cuda.platform import CudaPlatform
    cpu = CpuPlatform()
    assert cpu.slower_path(torch.float32) is None
    if cpu_kernels.load() is not None:
        assert "C kernels take float32 only: in bfloat16" in cpu.slower_path(torch.bfloat16)
    why = CudaPlatform().slower_path(torch.bfloat16)
    if importlib.util.find_spec("triton") is None:
        assert why.startswith("triton not installed: ")
    else:
        assert why is None


def test_unusable_and_unknown_selections_raise_one_line():
    reg = registry()
    with pytest.raises(PluginError, match=r"^--platform 'ascend' is not usable here: torch_npu not installed"):
        reg.get("platform", "ascend")
    with pytest.raises(PluginError, match=r"^unknown --all2all-backend 'x'; available: .*naive"):
        reg.get("all2all", "x")


def test_third_party_all2all_plugin(install_example, qwen3_moe_dir):
    env = install_example("epplat-example-all2all")
    listing = subprocess.run([sys.executable, "-m", "epplat.cli", "plugins"], capture_output=True, text=True,
                             env={**os.environ, **env}, check=True).stdout
    assert plugin_statuses(listing)["all_to_all"] == ("epplat-example-all2all", "usable")
    prompts = [[5, 17, 99, 230, 7, 64], [400, 401, 402]]
    ref = hf_greedy(qwen3_moe_dir, prompts, 10, ignore_eos=True)
    with Server(str(qwen3_moe_dir), "--dtype", "float32", "--max-model-len", "256",
                "--all2all-backend", "all_to_all", env=env) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
        for p, r in zip(prompts, ref):
            out = c.completions.create(model=str(qwen3_moe_dir), prompt=p, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 10
            assert out.choices[0].text == tok.decode(r, skip_special_tokens=True)
        assert "all2all all_to_all" in s.output()
