"""W8A8 (`--quantization ascend`) on the SIMULATED torch_npu (tests/sim_npu): the expert GEMMs through
npu_dynamic_quant / npu_grouped_matmul agree with a plain-torch reference of the same integer arithmetic;
a msModelSlim-layout checkpoint loads through the real loader (int8 weights, scales placed per EP rank)
and serves the same greedy tokens with DP=2 + EP as in one process; bad checkpoints are one line."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch

from server_utils import Server
from w8a8_checkpoint import quantize_per_channel, reference_w8a8_experts, write_w8a8_checkpoint

SIM = str(Path(__file__).resolve().parent / "sim_npu")
SIM_ENV = {"PYTHONPATH": os.pathsep.join([SIM, os.environ.get("PYTHONPATH", "")])}


def _experts_worker(_rank: int, case_path: str) -> None:
    sys.path.insert(0, SIM)
    import torch_npu  # noqa: F401  (the simulation)

    from epplat.platforms.ascend.w8a8 import w8a8_experts
    case = torch.load(case_path)
    out = w8a8_experts(case["x"], case["ids"], case["w"], case["w13q"], case["w2q"], torch.nn.functional.silu,
                       w13_scale=case["w13s"], w2_scale=case["w2s"])
    torch.save(out, case_path + ".out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_experts_match_integer_reference(tmp_path, dtype):
    torch.manual_seed(0)
    experts, hidden, inter, tokens, k = 6, 32, 48, 9, 2
    # checkpoint-layout weights [out, in] quantized per output channel, stored input-major as the layer keeps them
    gate_up = [quantize_per_channel(torch.randn(2 * inter, hidden)) for _ in range(experts)]
    down = [quantize_per_channel(torch.randn(hidden, inter)) for _ in range(experts)]
    w13q = torch.stack([q.t() for q, _ in gate_up]).contiguous()
    w13s = torch.stack([s.reshape(-1) for _, s in gate_up]).to(dtype)
    w2q = torch.stack([q.t() for q, _ in down]).contiguous()
    w2s = torch.stack([s.reshape(-1) for _, s in down]).to(dtype)
    x = torch.randn(tokens, hidden).to(dtype)
    ids = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    ids[3, 1] = -1                                   # an expert on another rank
    w = torch.rand(tokens, k).to(dtype)
    case = tmp_path / "case.pt"
    torch.save(dict(x=x, ids=ids, w=w, w13q=w13q, w13s=w13s, w2q=w2q, w2s=w2s), case)
    torch.multiprocessing.spawn(_experts_worker, args=(str(case),), nprocs=1)
    out = torch.load(str(case) + ".out")
    valid = torch.where(ids >= 0, ids, 0)
    ref = reference_w8a8_experts(x, valid, torch.where(ids >= 0, w, 0), w13q, w13s, w2q, w2s)
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    # and the int8 path is not the float one: a float reference differs by the quantization error
    assert out.dtype == dtype and not torch.equal(out, torch.zeros_like(out))


@pytest.fixture(scope="module")
def w8a8_dir(qwen3_moe_dir, tmp_path_factory):
    return write_w8a8_checkpoint(Path(qwen3_moe_dir), tmp_path_factory.mktemp("qwen3_moe_w8a8"))


PROMPTS = [[5, 17, 99, 230, 7, 64, 300, 12], [400, 401, 402], list(range(100, 130)), [1500, 1200, 900]]


def _complete(url, model):
    async def go():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(*(c.completions.create(model=model, prompt=p, max_tokens=8, temperature=0,
                                                         extra_body={"ignore_eos": True}) for p in PROMPTS))
        return [r.choices[0].text for r in rs]
    return asyncio.run(go())


def test_w8a8_checkpoint_serves_the_same_tokens_with_dp2_ep(w8a8_dir):
    base = (str(w8a8_dir), "--platform", "ascend", "--quantization", "ascend", "--dtype", "float32",
            "--max-model-len", "256")
    with Server(*base, env=SIM_ENV) as s:
        single = _complete(s.url, str(w8a8_dir))
        log1 = s.output()
    with Server(*base, "-dp", "2", "-ep", "--additional-config", '{"enable_weight_nz_layout": true}', env=SIM_ENV) as s:
        assert _complete(s.url, str(w8a8_dir)) == single
        log2 = s.output()
    assert all(t for t in single)
    # int8 experts: a quarter of the float32 expert bytes, and half of them on each EP rank
    import re
    m1 = re.search(r"model weights take ([\d.]+) GiB", log1)
    assert m1 and "EP rank 1/2 holds experts 4-7 of 8" in log2
    ep = [int(b) for b in re.findall(r"resident expert bytes (\d+) of", log2)]
    # 2 layers x 4 local experts x (64*128 + 64*64) int8 bytes
    assert ep == [2 * 4 * (64 * 128 + 64 * 64)] * 2, ep


def test_bad_w8a8_inputs_are_one_line(qwen3_moe_dir, w8a8_dir, tmp_path):
    def serve(model, *flags, env=SIM_ENV):
        return subprocess.run([sys.executable, "-m", "epplat.cli", "serve", str(model), "--max-model-len", "256",
                               "--kv-cache-memory-bytes", "64M", *flags], capture_output=True, text=True,
                              timeout=120, env={**os.environ, **env})

    def one_line(r, needle):
        errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
        assert r.returncode != 0 and len(errors) == 1 and needle in errors[0], r.stderr
        assert "Traceback" not in r.stderr

    one_line(serve(qwen3_moe_dir, "--platform", "cpu", "--quantization", "ascend", env={}),
             "--quantization 'ascend' runs on ascend, not on platform 'cpu'")
    one_line(serve(qwen3_moe_dir, "--platform", "ascend", "--quantization", "ascend"),
             "needs quant_model_description.json")
    attn = tmp_path / "attn"
    write_w8a8_checkpoint(Path(qwen3_moe_dir), attn)
    desc = json.loads((attn / "quant_model_description.json").read_text())
    desc["model.layers.0.self_attn.q_proj.weight"] = "W8A8_DYNAMIC"
    (attn / "quant_model_description.json").write_text(json.dumps(desc))
    one_line(serve(attn, "--platform", "ascend", "--quantization", "ascend"), "quantizes the MoE expert weights only")
    desc["model.layers.0.self_attn.q_proj.weight"] = "W8A8"
    (attn / "quant_model_description.json").write_text(json.dumps(desc))
    one_line(serve(attn, "--platform", "ascend", "--quantization", "ascend"), "is 'W8A8'; --quantization ascend serves")
