"""W8A8 (`--quantization ascend`) on the SIMULATED torch_npu (tests/simulations/npu): the expert GEMMs through
npu_dynamic_quant / npu_grouped_matmul and the linear ones through npu_quant_matmul agree with a
plain-torch reference of the same integer arithmetic; a msModelSlim-layout checkpoint (int8 experts,
q/k/v/o and a dense MLP) loads through the real loader, its linears sliced per TP rank, and serves the
greedy tokens of transformers' model computing with that integer arithmetic, in one process and with
DP=2 + EP; bad checkpoints are one line."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import openai
import pytest
import torch

import cli_cases
import simulations
from hf_oracle import hf_greedy
from server_utils import Server
from w8a8_checkpoint import (EXPERT_WEIGHT, quantize_per_channel, reference_w8a8_experts, reference_w8a8_greedy,
                             reference_w8a8_linear, write_w8a8_checkpoint)

SIM_ENV = simulations.env("npu")


def _experts_worker(_rank: int, case_path: str) -> None:
    import torch_npu  # noqa: F401  (the simulation)

    from epplat.platforms.ascend.w8a8 import w8a8_experts
    case = torch.load(case_path)
    x, ids, w = case["x"], case["ids"], case["w"]
    # the rows of the case; a rank with no rows at all; rows whose experts all live on other ranks
    outs = [w8a8_experts(x_, ids_, w, case["w13q"], case["w2q"], torch.nn.functional.silu, w13_scale=case["w13s"],
                         w2_scale=case["w2s"]) for x_, ids_ in ((x, ids), (x[:0], ids[:0]), (x, torch.full_like(ids, -1)))]
    torch.save(outs, case_path + ".out")


def _scale_dtype(dtype):
    """npu_grouped_matmul's per-token int8 pairs: a bf16 scale with bf16 output, an fp32 one with fp16."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8a8_experts_match_integer_reference(tmp_path, dtype, simulation):
    simulation("npu")
    torch.manual_seed(0)
    experts, hidden, inter, tokens, k = 6, 32, 48, 9, 2
    # checkpoint-layout weights [out, in] quantized per output channel, stored input-major as the layer keeps them
    gate_up = [quantize_per_channel(torch.randn(2 * inter, hidden)) for _ in range(experts)]
    down = [quantize_per_channel(torch.randn(hidden, inter)) for _ in range(experts)]
    w13q = torch.stack([q.t() for q, _ in gate_up]).contiguous()
    w13s = torch.stack([s.reshape(-1) for _, s in gate_up]).to(_scale_dtype(dtype))
    w2q = torch.stack([q.t() for q, _ in down]).contiguous()
    w2s = torch.stack([s.reshape(-1) for _, s in down]).to(_scale_dtype(dtype))
    x = torch.randn(tokens, hidden).to(dtype)
    ids = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    ids[3, 1] = -1                                   # an expert on another rank
    w = torch.rand(tokens, k).to(dtype)
    case = tmp_path / "case.pt"
    torch.save(dict(x=x, ids=ids, w=w, w13q=w13q, w13s=w13s, w2q=w2q, w2s=w2s), case)
    torch.multiprocessing.spawn(_experts_worker, args=(str(case),), nprocs=1)
    out, empty, elsewhere = torch.load(str(case) + ".out")
    # the documented grouped-matmul rules hold for zero rows too: an empty x with an all-zero group_list
    assert empty.shape == (0, hidden) and torch.equal(elsewhere, torch.zeros_like(elsewhere))
    valid = torch.where(ids >= 0, ids, 0)
    ref = reference_w8a8_experts(x, valid, torch.where(ids >= 0, w, 0), w13q, w13s, w2q, w2s)
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    # and the int8 path is not the float one: a float reference differs by the quantization error
    assert out.dtype == dtype and not torch.equal(out, torch.zeros_like(out))


def _linear_worker(_rank: int, case_path: str) -> None:
    import torch_npu  # noqa: F401  (the simulation)

    from epplat.platforms.ascend.w8a8 import w8a8_linear
    c = torch.load(case_path)
    # the layer keeps the int8 weight input-major ([in, out]), as npu_quant_matmul's x2
    torch.save([w8a8_linear(x, c["wq"].t().contiguous(), c["ws"].reshape(-1).to(_scale_dtype(c["x"].dtype)), bias)
                for x, bias in ((c["x"], None), (c["x"], c["bias"]), (c["x"][:0], c["bias"]))], case_path + ".out")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8a8_linear_matches_integer_reference(tmp_path, dtype, simulation):
    simulation("npu")
    torch.manual_seed(1)
    wq, ws = quantize_per_channel(torch.randn(40, 96))
    x, bias = (torch.randn(7, 96) * 3).to(dtype), torch.randn(40).to(dtype)
    x[2] *= 50                                        # per-token scales: one loud row does not flatten the others
    case = tmp_path / "case.pt"
    torch.save(dict(x=x, wq=wq, ws=ws, bias=bias), case)
    torch.multiprocessing.spawn(_linear_worker, args=(str(case),), nprocs=1)
    plain, biased, empty = torch.load(str(case) + ".out")
    assert empty.shape == (0, 40)            # a dummy step's no tokens: npu_quant_matmul takes no empty x1
    ref = reference_w8a8_linear(x, wq, ws.to(_scale_dtype(dtype)))
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(plain, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(biased, ref + bias, rtol=tol, atol=tol)
    # int8 arithmetic, not the float GEMM: in float16 the float result is far outside the tolerance
    exact = x.float() @ (wq.float() * ws).t()
    assert plain.dtype == dtype and (dtype != torch.float16 or (plain.float() - exact).abs().max() > 10 * tol)


def _tp_worker(_rank: int, model_dir: str, out_path: str) -> None:
    """Load the W8A8 checkpoint with the real loader as TP=1 and as TP ranks 0 and 1 of 2, and run the
    layer-0 linears of each (no process groups: the partial sums of the row-parallel GEMMs are returned)."""
    import torch_npu  # noqa: F401  (the simulation)
    from types import SimpleNamespace

    from epplat.core.distributed.parallel_state import ParallelState
    from epplat.core.model import qwen3_moe
    from epplat.core.model.decoder import MoEForCausalLM
    from epplat.core.ops import gated_act
    from epplat.core.model.loader import load_checkpoint
    from epplat.core.moe.all2all import All2AllBackend, ExpertMap
    from epplat.platforms.ascend.w8a8 import AscendW8A8

    hf = json.loads((Path(model_dir) / "config.json").read_text())
    mcfg = qwen3_moe.parse_config(hf)
    cfg = SimpleNamespace(model=SimpleNamespace(model=model_dir), parallel=SimpleNamespace(enable_eplb=False))
    torch.manual_seed(3)
    x = torch.randn(5, mcfg.hidden_size).half()           # torch_npu's int8 ops take float16 / bfloat16
    o_in = torch.randn(5, mcfg.num_heads * mcfg.head_dim).half()
    results = {}
    for tp, rank in ((1, 0), (2, 0), (2, 1)):
        model = MoEForCausalLM(mcfg, All2AllBackend(ExpertMap(mcfg.num_experts)), torch.float16,
                               ParallelState(tp_rank=rank, tp_size=tp))
        quant = AscendW8A8(cfg, qwen3_moe.canonical_name)
        quant.process_model(model)
        load_checkpoint(model, model_dir, qwen3_moe.canonical_name, "cpu", show_progress=False, quant=quant)
        quant.after_loading(model)
        attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
        h = attn.h * attn.d
        results[(tp, rank)] = dict(
            qkv=attn.qkv.detach().clone(), qkv_scale=attn.qkv_scale.detach().clone(), o=attn.o_proj.detach().clone(),
            o_scale=attn.o_proj_scale.detach().clone(), gate_up=mlp.gate_up.detach().clone(),
            down=mlp.down.detach().clone(), down_scale=mlp.down_scale.detach().clone(),
            qkv_out=attn.project("qkv", x), o_out=attn.project("o_proj", o_in[:, rank * h:(rank + 1) * h]),
            mlp_out=mlp.project("down", gated_act(mlp.project("gate_up", x), mlp.act)))
    torch.save(results, out_path)


def test_w8a8_linears_shard_over_tp(w8a8_dir, tmp_path, simulation):
    simulation("npu")
    out = tmp_path / "tp.pt"
    torch.multiprocessing.spawn(_tp_worker, args=(str(w8a8_dir), str(out)), nprocs=1)
    r = torch.load(out)
    full, r0, r1 = r[(1, 0)], r[(2, 0)], r[(2, 1)]
    from safetensors.torch import load_file
    ck = load_file(str(w8a8_dir / "quant_model_weights-00001-of-00001.safetensors"))
    p = "model.layers.0."
    q, k, v = (ck[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
    assert full["qkv"].dtype == torch.int8 and torch.equal(full["qkv"], torch.cat([q, k, v]).t())
    # 4 heads / 2 KV heads of 32: rank 1 holds q rows 64-127 and KV head 1 (rows 32-63 of k and v)
    assert torch.equal(r1["qkv"], torch.cat([q[64:], k[32:], v[32:]]).t())
    qs, ks, vs = (ck[p + f"self_attn.{n}_proj.weight_scale"].reshape(-1) for n in "qkv")
    assert torch.equal(r1["qkv_scale"], torch.cat([qs[64:], ks[32:], vs[32:]]))
    o = ck[p + "self_attn.o_proj.weight"]
    assert torch.equal(r0["o"], o[:, :64].t()) and torch.equal(r1["o"], o[:, 64:].t())
    assert torch.equal(r0["o_scale"], full["o_scale"]) and torch.equal(r1["o_scale"], full["o_scale"])
    gate, up, down = (ck[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    inter = gate.shape[0] // 2
    assert torch.equal(r1["gate_up"], torch.cat([gate[inter:], up[inter:]]).t())
    assert torch.equal(r1["down"], down[:, inter:].t()) and torch.equal(r1["down_scale"], full["down_scale"])
    # column-parallel outputs are the TP=1 output's columns, exactly (the same per-token quantization)
    qn, kn = 128, 64
    torch.testing.assert_close(r1["qkv_out"], torch.cat([full["qkv_out"][:, 64:qn], full["qkv_out"][:, qn + 32:qn + kn],
                                                         full["qkv_out"][:, qn + kn + 32:]], dim=1), rtol=0, atol=0)
    # row-parallel partial sums add up to the TP=1 output up to each rank's own activation quantization
    for name in ("o_out", "mlp_out"):
        total, ref = r0[name] + r1[name], full[name]
        assert (total - ref).abs().max() < 0.05 * ref.abs().max(), name


@pytest.fixture(scope="module")
def w8a8_dir(qwen3_moe_dir, tmp_path_factory):
    # layer 0 dense (msModelSlim quantizes its gate/up/down too), layer 1 MoE; q/k/v/o quantized in both
    return write_w8a8_checkpoint(Path(qwen3_moe_dir), tmp_path_factory.mktemp("qwen3_moe_w8a8"), dense_layers=(0,))


PROMPTS = [[5, 17, 99, 230, 7, 64, 300, 12], [400, 401, 402], list(range(100, 130)), [1500, 1200, 900]]


def _complete(url, model):
    async def go():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(*(c.completions.create(model=model, prompt=p, max_tokens=8, temperature=0,
                                                         extra_body={"ignore_eos": True}) for p in PROMPTS))
        return [r.choices[0].text for r in rs]
    return asyncio.run(go())


def test_w8a8_checkpoint_serves_the_reference_tokens_with_dp2_ep(w8a8_dir, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(w8a8_dir)
    ref_ids = reference_w8a8_greedy(w8a8_dir, tmp_path / "reference", PROMPTS, 8, torch.float16)
    # the oracle tells the int8 arithmetic from float GEMMs on the dequantized weights
    assert ref_ids != hf_greedy(tmp_path / "reference", PROMPTS, 8, ignore_eos=True)
    ref = [tok.decode(r, skip_special_tokens=True) for r in ref_ids]
    base = (str(w8a8_dir), "--platform", "ascend", "--quantization", "ascend", "--dtype", "float16",
            "--max-model-len", "256")
    with Server(*base, env=SIM_ENV) as s:
        single = _complete(s.url, str(w8a8_dir))
        log1 = s.output()
    assert single == ref
    # PP=2: stage 0 holds the dense layer 0 (no experts), stage 1 the MoE layer 1, expert-parallel over DP=2
    with Server(*base, "-pp", "2", "-dp", "2", "-ep", "--additional-config", '{"enable_weight_nz_layout": true}',
                env=SIM_ENV, timeout=300) as s:
        assert _complete(s.url, str(w8a8_dir)) == single
        log2 = s.output()
    assert all(t for t in single)
    # int8 experts: half of the float16 expert bytes, and half of them on each EP rank
    import re
    m1 = re.search(r"model weights take ([\d.]+) GiB", log1)
    assert m1 and "EP rank 1/2 holds experts 4-7 of 8" in log2
    ep = [int(b) for b in re.findall(r"resident expert bytes (\d+) of", log2)]
    # 1 MoE layer x 4 local experts x (64*128 + 64*64) int8 bytes
    assert ep == [4 * (64 * 128 + 64 * 64)] * 2, ep


def test_bad_w8a8_inputs_are_one_line(qwen3_moe_dir, w8a8_dir, tmp_path):
    flags = ["--max-model-len", "256", "--kv-cache-memory-bytes", "64M", "--dtype", "bfloat16"]
    ascend = ["--platform", "ascend", "--quantization", "ascend"]
    (r,) = cli_cases.run([["serve", qwen3_moe_dir, *flags, "--platform", "cpu", "--quantization", "ascend"]])
    cli_cases.assert_one_error_line(r, "--quantization 'ascend' runs on ascend, not on platform 'cpu'")
    bad = write_w8a8_checkpoint(Path(qwen3_moe_dir), tmp_path / "bad")
    desc = json.loads((bad / "quant_model_description.json").read_text())
    plain = write_w8a8_checkpoint(Path(qwen3_moe_dir), tmp_path / "experts_only", quantize=EXPERT_WEIGHT)
    pdesc = json.loads((plain / "quant_model_description.json").read_text())

    def changed(base: Path, base_desc: dict, name: str, **changes) -> Path:
        """A copy of `base` whose quant_model_description.json has `changes` (__ for . in the keys)."""
        out = tmp_path / name
        shutil.copytree(base, out)
        (out / "quant_model_description.json").write_text(
            json.dumps({**base_desc, **{k.replace("__", "."): v for k, v in changes.items()}}))
        return out

    cases = [
        ([qwen3_moe_dir], "needs quant_model_description.json"),
        # torch_npu's int8 ops take no float32 (the simulation refuses it as they do): refused before loading
        ([w8a8_dir, "--dtype", "float32"],
         "--quantization ascend computes in bfloat16 or float16 (torch_npu's int8 ops take no float32)"),
        ([changed(bad, desc, "lm_head", lm_head__weight="W8A8_DYNAMIC")],
         "keep the embeddings, norms, router gate and lm_head FLOAT"),
        ([changed(bad, desc, "k_proj", model__layers__1__self_attn__k_proj__weight="FLOAT")],
         "layer 1 quantizes q_proj but not k_proj"),
        ([changed(bad, desc, "static", model__layers__0__self_attn__q_proj__weight="W8A8")],
         "is static 'W8A8' (input_scale/deq_scale)"),
        # a float tensor marked W8A8_DYNAMIC, and a quantized linear without its scale
        ([changed(plain, pdesc, "dense", model__layers__0__mlp__down_proj__weight="W8A8_DYNAMIC")],
         "layer 0 has no dense MLP"),
        ([changed(plain, pdesc, "o_proj", model__layers__0__self_attn__o_proj__weight="W8A8_DYNAMIC")],
         "torch.float32, not int8"),
    ]
    results = cli_cases.run([["serve", model, *flags, *ascend, *more] for (model, *more), _ in cases], env=SIM_ENV)
    for ((model, *_), needle), r in zip(cases, results):
        cli_cases.assert_one_error_line(r, needle, model)
