"""The platform contract: each platform hands the model its own Kernels record (two platforms in
one process do not change each other's kernels), core holds no kernel registry and no device
branch, and a third-party platform package (examples/epplat-example-platform) installed with pip
serves transformers' greedy tokens through its own kernels with ``--platform einsum`` (and adds its own
``epplat`` subcommand through the CLI hook), while ``--platform auto`` keeps epplat's own platform unless a
plugin's declares that it fits the machine better."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import openai
import pluggy
import pytest
import torch

from epplat import hookspecs
from epplat.hookspecs import Registration, hookimpl
from epplat.plugins import PluginError, Registry, registry
from hf_oracle import hf_greedy
from plugin_listing import plugin_statuses
from server_utils import Server

CORE = Path(__file__).resolve().parent.parent / "epplat" / "core"


@pytest.fixture(scope="module")
def example_env(install_example):
    return install_example("epplat-example-platform")


def _tiny_model(kernels):
    from epplat.core.model.decoder import DecoderConfig, MoEForCausalLM
    from epplat.core.moe.all2all import ExpertMap
    from epplat.core.moe.all2all_torch import AllGatherReduceScatter
    cfg = DecoderConfig(vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                        max_position=64, rope_theta=1e6, rms_norm_eps=1e-6, num_experts=8, top_k=2,
                        moe_intermediate_size=32, intermediate_size=0, qk_norm=True)
    torch.manual_seed(0)
    model = MoEForCausalLM(cfg, AllGatherReduceScatter(ExpertMap(8)), torch.float32, kernels=kernels)
    for p in model.parameters():
        p.data.copy_(torch.randn(p.shape) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    model.layers[0].self_attn.kv_cache = (torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16))
    return model


def _prefill(model, kernels):
    from epplat.core.model.attention import build_attn_metadata
    meta = build_attn_metadata([(5, 5, [0])], 16, torch.device("cpu"), pad_block=3, kernels=kernels)
    with torch.inference_mode():
        return model(torch.tensor([1, 7, 3, 9, 2]), torch.arange(5), meta)


def test_two_platforms_in_one_process_keep_their_own_kernels(example_env, monkeypatch):
    """The cpu platform and the example einsum platform (a device type "cpu" too) built in one process,
    in both orders: each keeps its record, each model calls only its own platform's kernels, and both
    compute the same layer."""
    from epplat.platforms.cpu import cpu_kernels
    from epplat.platforms.cpu.platform import CpuPlatform
    monkeypatch.syspath_prepend(example_env["PYTHONPATH"].split(os.pathsep)[0])
    example = importlib.import_module("epplat_example_platform")
    cpu = CpuPlatform()
    einsum = example.EinsumPlatform()
    CpuPlatform()                       # built again after the other: rewires nothing
    assert cpu.kernels.experts is cpu_kernels.moe_experts and cpu.kernels.rms_norm is cpu_kernels.rms_norm
    assert einsum.kernels.experts is example.dense_experts and einsum.kernels.rms_norm is example.rms_norm
    assert einsum.kernels.decode_attention is None and einsum.kernels.linear is None
    models = {p: _tiny_model(p.kernels) for p in (cpu, einsum)}
    for platform, model in models.items():
        holders = [m for m in model.modules() if "kernels" in vars(m)]
        assert holders and all(m.kernels is platform.kernels for m in holders)
    example.CALLS.clear()
    on_cpu = _prefill(models[cpu], cpu.kernels)
    assert not example.CALLS                      # the cpu model never reached the einsum kernels
    on_einsum = _prefill(models[einsum], einsum.kernels)
    assert example.CALLS["experts"] == 1 and example.CALLS["route"] == 1 and example.CALLS["rms_norm"] == 5
    torch.testing.assert_close(on_einsum, on_cpu, rtol=1e-4, atol=1e-4)


def test_core_has_no_kernel_registry_and_no_device_branch():
    branch = re.compile(r"device\.type\s*==|\.is_cuda\b|platform(\.name)?\s*==|_KERNELS\s*[:=]")
    found = [f"{p.relative_to(CORE.parent.parent)}:{i}: {line.strip()}" for p in sorted(CORE.rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if branch.search(line)]
    assert not found, "\n".join(found)
    platform_imports = [str(p) for p in CORE.rglob("*.py") if "epplat.platforms" in p.read_text()]
    assert not platform_imports, platform_imports


class _Platforms:
    """A plugin (registered with pluggy as an entry point's module would be) listing `regs` as its platforms."""

    def __init__(self, *regs):
        self.regs = regs

    @hookimpl
    def epplat_platforms(self):
        return list(self.regs)


def _registry_with(*regs) -> Registry:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    pm.register(_Platforms(*regs), name="vendor")
    return Registry(pm)


def test_platform_auto_prefers_epplats_own_unless_a_plugin_says_it_fits_better():
    """--platform auto: a usable plugin platform of the default priority loses to the built-in one the machine
    matches (cpu here, cuda on a GPU host); one that declares a higher auto_priority wins; two plugins
    tied at the top are one line asking for --platform."""
    builtin = registry().pick_platform()
    assert builtin in ("cpu", "cuda", "ascend")
    plain = Registration("vendor_cpu", lambda: None)
    assert _registry_with(plain).pick_platform() == builtin
    unusable = Registration("vendor_npu", lambda: None, check=lambda: "no vendor NPU here", auto_priority=5)
    assert _registry_with(plain, unusable).pick_platform() == builtin
    better = Registration("vendor_npu", lambda: None, auto_priority=2)
    assert _registry_with(plain, better).pick_platform() == "vendor_npu"
    assert _registry_with(better).pick_platform("cpu") == "cpu"        # a named platform is taken as named
    rival = Registration("vendor_gpu", lambda: None, auto_priority=2)
    with pytest.raises(PluginError, match=r"^--platform auto: 'vendor_gpu' \(vendor\), 'vendor_npu' \(vendor\) all "
                                          r"fit this machine equally; choose one with --platform$"):
        _registry_with(better, rival).pick_platform()


def test_example_platform_package_serves_transformers_tokens(example_env, qwen3_moe_dir):
    listing = subprocess.run([sys.executable, "-m", "epplat.cli", "plugins"], capture_output=True, text=True,
                             env={**os.environ, **example_env}, check=True).stdout
    assert plugin_statuses(listing)["einsum"] == ("epplat-example-platform", "usable")
    auto = subprocess.run([sys.executable, "-c", "from epplat.plugins import registry; print(registry().pick_platform())"],
                          capture_output=True, text=True, env={**os.environ, **example_env}, check=True).stdout.split()
    assert auto == [registry().pick_platform()]      # installed and usable, yet --platform auto keeps epplat's own
    kernels = subprocess.run([sys.executable, "-m", "epplat.cli", "einsum-kernels"], capture_output=True, text=True,
                             env={**os.environ, **example_env}, check=True).stdout.split()   # the package's own command
    assert kernels[:2] == ["rms_norm", "epplat_example_platform.rms_norm"] and "epplat_example_platform.dense_experts" in kernels
    prompts = [[5, 17, 99, 230, 7, 64], [400, 401, 402]]
    ref = hf_greedy(qwen3_moe_dir, prompts, 8, ignore_eos=True)
    with Server(str(qwen3_moe_dir), "--platform", "einsum", "--dtype", "float32", "--max-model-len", "256",
                env=example_env) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        out = c.completions.create(model=str(qwen3_moe_dir), prompt=prompts, max_tokens=8, temperature=0,
                                   extra_body={"ignore_eos": True})
        log = s.output()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    texts = {ch.index: ch.text for ch in out.choices}
    assert [texts[i] for i in range(len(prompts))] == [tok.decode(r, skip_special_tokens=True) for r in ref]
    for kernel in ("rms_norm", "route", "experts"):
        assert f"einsum platform: the {kernel} kernel runs" in log, log[-3000:]
    assert "platform einsum" in log
