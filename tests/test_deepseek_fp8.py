"""``--quantization fp8`` with DeepSeek-V3's own fp8 checkpoint layout (``epplat make-model --fp8``) on
cpu, where the fp8 weights are dequantized at load: served greedy tokens equal transformers' on a
dequantized copy of the same checkpoint, the startup log says what was dequantized, and checkpoints
the method cannot serve are one line. (The cuda platform's fp8 GEMMs: tests/test_gpu.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from fp8_dequantized import write_dequantized
from server_utils import Server
from test_deepseek import DIMS, PROMPTS, expected
from test_parallel import complete


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory):
    """A V3-style fp8 checkpoint (tiny shapes: blocks cut short at the edges) and its dequantized copy."""
    from epplat.tools.make_model import make_model
    root = tmp_path_factory.mktemp("deepseek_v3_fp8")
    d = make_model("deepseek_v3", root / "fp8", experts=8, seed=7, q_lora_rank=32, fp8=True, **DIMS)
    return d, write_dequantized(d, root / "dequantized")


def test_make_model_writes_deepseek_v3_fp8_layout(fp8_dirs):
    from safetensors import safe_open
    d, _ = fp8_dirs
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        assert f.get_slice("model.layers.0.mlp.down_proj.weight_scale_inv").get_shape() == [1, 1]
    fp8 = {k for k, t in dtypes.items() if t == "F8_E4M3"}
    assert {k + "_scale_inv" for k in fp8} == {k for k in dtypes if k.endswith("_scale_inv")}
    a = "model.layers.1.self_attn."
    for k in (a + "q_a_proj", a + "q_b_proj", a + "kv_a_proj_with_mqa", a + "kv_b_proj", a + "o_proj",
              "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.shared_experts.down_proj",
              "model.layers.1.mlp.experts.7.up_proj"):
        assert k + ".weight" in fp8, k
    for k in ("model.embed_tokens", "lm_head", "model.layers.1.mlp.gate", a + "kv_a_layernorm", a + "q_a_layernorm"):
        assert dtypes[k + ".weight"] == "F32", k


def test_fp8_checkpoint_on_cpu_matches_transformers_on_the_dequantized_copy(fp8_dirs):
    d, deq = fp8_dirs
    with Server(str(d), "--quantization", "fp8", "--dtype", "float32", "-pp", "2", "--max-model-len", "256",
                "--max-num-batched-tokens", "32", "--served-model-name", "ds") as s:
        assert complete(s.url, "ds", PROMPTS) == expected(deq)
        # 2 layers over 2 pipeline stages: 5 attention linears each, stage 0 a dense MLP (3), stage 1 8 experts
        # and a shared one (27)
        for n in (8, 32):
            assert f"--quantization fp8 on cpu: the checkpoint's {n} fp8 weights (128x128 block scales) are " \
                   "dequantized to float32 at load" in s.output(), s.output()


def test_checkpoints_fp8_cannot_serve_are_one_line(fp8_dirs, tmp_path):
    from epplat.config import ConfigError, EngineConfig, ModelConfig
    d, deq = fp8_dirs

    def check(model_dir):
        EngineConfig(model=ModelConfig(model=str(model_dir), quantization="fp8"), platform="cpu").check()

    with pytest.raises(ConfigError, match="needs the cuda platform"):
        check(deq)
    cfg = EngineConfig(model=ModelConfig(model=str(d)), platform="cpu")
    cfg.check()
    assert cfg.model.quantization == "fp8"        # as vLLM: the checkpoint's quantization_config picks the method
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).symlink_to(f)
    cfg = json.loads((d / "config.json").read_text())
    for qc, needle in (({"weight_block_size": [128, 64]}, "square weight blocks"),
                       ({"activation_scheme": "static"}, "dynamic activation scales"),
                       ({"quant_method": "awq"}, "quantized with 'awq'")):
        (bad / "config.json").unlink()
        (bad / "config.json").write_text(json.dumps({**cfg, "quantization_config": {**cfg["quantization_config"], **qc}}))
        with pytest.raises(ConfigError, match=needle):
            check(bad)


_FP8_LINEAR_INTERPRETED = r'''
import torch
from epplat.core.model.fp8_blocks import dequantize_blocks, quantize_blocks
from epplat.platforms.cuda import fp8_linear as fl
torch.manual_seed(0)
for (m, n, k), fl.TARGET_PROGRAMS in zip(((1, 576, 2048), (1, 576, 2048), (3, 200, 300), (20, 130, 128), (70, 256, 384),
                                          (300, 130, 200)), (264, 1, 1, 264, 264, 264)):
    # TARGET_PROGRAMS 1: no split-K, a K loop of many blocks; 300 rows: the fp8-dot form (activations quantized)
    # activations that quantize exactly (each 128-group: fp8 values times its own power-of-two scale, one at
    # +-448): the interpreter rounds some values to float8 unlike the GPU (just under a power of two), so the
    # rounding itself is checked in test_gpu.py
    groups = -(-k // 128)
    v = (torch.rand(m, groups * 128) * 896 - 448).to(torch.float8_e4m3fn).float()
    v[:, ::128] = 448.0
    x = (v.view(m, groups, 128) * torch.randint(-3, 3, (m, groups, 1)).exp2()).view(m, -1)[:, :k]
    q, s = quantize_blocks(torch.randn(n, k) / k ** 0.5)
    y = fl.fp8_linear(x, q, s, out_dtype=torch.float32).double()
    ref = x.double() @ dequantize_blocks(q, s, 128, torch.float64).t()
    err = ((y - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, (m, n, k, err)
print("ok")
'''


_FP8_EXPERTS_INTERPRETED = r'''
import torch
from epplat.platforms.cuda import fp8_moe, triton_moe, triton_moe_sorted
from epplat.core.moe.experts import reference_experts
torch.manual_seed(0)
e, k, h, i = 8, 2, 128, 128
q13, s13 = fp8_moe.quantize(torch.randn(e, h, 2 * i) / h ** 0.5)
q2, s2 = fp8_moe.quantize(torch.randn(e, i, h) / i ** 0.5)
# float16: the interpreter's bfloat16 dot is not faithful; the kernels round the dequantized tile to x's dtype
d13, d2 = fp8_moe.dequantize(q13, s13, torch.float16), fp8_moe.dequantize(q2, s2, torch.float16)
for tokens in (1, 9):       # 1: programs by slot (fewer assignments than experts), else by expert
    x = torch.randn(tokens, h).to(torch.float16)
    ids = torch.rand(tokens, e).topk(k, dim=-1).indices
    w = torch.softmax(torch.randn(tokens, k), -1).to(torch.float16)
    ref = reference_experts(x.float(), ids, w.float(), d13.float(), d2.float(), torch.nn.functional.silu)
    for kern, tiles in ((triton_moe.triton_experts, triton_moe.Tiles(16, 64, 128, 64, 128, 2, 4)),
                        (triton_moe_sorted.sorted_experts, triton_moe.Tiles(16, 64, 64, 64, 64, 2, 4))):
        fp8 = kern(x, ids, w, q13, q2, torch.nn.functional.silu, tiles=tiles, w13_scale=s13, w2_scale=s2)
        assert torch.equal(fp8, kern(x, ids, w, d13, d2, torch.nn.functional.silu, tiles=tiles)), (tokens, kern)
        assert (fp8.float() - ref).abs().max() < 1e-2 * ref.abs().max(), (tokens, kern)
print("ok")
'''


def test_triton_fp8_experts_in_the_triton_interpreter():
    """The expert kernels with fp8 weights (W8: the fp8 tile times its block scales, rounded to x's dtype in
    registers) give exactly what they give on the dequantized weights, masked and expert-sorted, with a
    128-deep (one scale block) and a 64-deep reduction step, in Triton's CPU interpreter; skipped without
    triton."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-c", _FP8_EXPERTS_INTERPRETED], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_triton_fp8_block_linear_in_the_triton_interpreter():
    """The cuda platform's fp8 block GEMM (tails, split-K, per-row and per-group activation scales, 128x128
    weight block scales) run by Triton's CPU interpreter against float64; skipped without triton."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-c", _FP8_LINEAR_INTERPRETED], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def _cuda_method_loads(model_dir, tp: int):
    """Each TP rank's model as the cuda platform's fp8 method loads it (on cpu: loading needs no GPU)."""
    from epplat.config import EngineConfig, ModelConfig
    from epplat.core.distributed.parallel_state import ParallelState
    from epplat.core.model.decoder import MoEForCausalLM
    from epplat.core.model.loader import load_checkpoint
    from epplat.core.model.registry import architecture
    from epplat.core.moe.all2all import ExpertMap
    from epplat.core.moe.all2all_torch import AllGatherReduceScatter
    from epplat.platforms.cuda.fp8 import Fp8BlockQuant
    cfg = EngineConfig(model=ModelConfig(model=str(model_dir), dtype="bfloat16", quantization="fp8"), platform="cuda")
    hf = cfg.model.hf_config()
    arch = architecture(hf)
    mc = arch.parse_config(hf)
    for r in range(tp):
        model = getattr(arch, "MODEL", MoEForCausalLM)(mc, AllGatherReduceScatter(ExpertMap(mc.num_experts), device=torch.device("cpu")),
                           torch.bfloat16, ParallelState(rank=r, world_size=tp, tp_rank=r, tp_size=tp))
        quant = Fp8BlockQuant(cfg, arch.canonical_name)
        quant.process_model(model)
        load_checkpoint(model, str(model_dir), arch.canonical_name, "cpu", False, quant)
        quant.after_loading(model)
        yield model


def test_cuda_fp8_method_keeps_each_tp_ranks_fp8_blocks(tmp_path):
    """The cuda platform's --quantization fp8 on a DeepSeek-V3-layout checkpoint (shapes whose TP=2 halves
    are whole 128-blocks): every linear is an fp8 parameter holding the checkpoint's bytes of this rank's
    rows / columns, with the matching rows / columns of weight_scale_inv (gate and up stacked), kv_b_proj's
    bf16 copy for the absorbed decode is its dequantized slice, and a TP split through the middle of a
    block is refused in one line."""
    from safetensors.torch import load_file

    from epplat.core.model.fp8_blocks import dequantize_blocks
    from epplat.tools.make_model import make_model
    d = make_model("deepseek_v3", tmp_path / "m", fp8=True, dtype="bfloat16", layers=2, hidden=256, heads=4,
                   head_dim=128, rope_head_dim=64, moe_intermediate=256, intermediate=512, kv_lora_rank=128,
                   q_lora_rank=128, experts=8, vocab_size=512, seed=1)
    ck = load_file(str(d / "model.safetensors"))

    def fp8_bytes(t):
        return t.view(torch.uint8)

    for r, model in enumerate(_cuda_method_loads(d, 2)):
        a, mlp, shared = model.layers[1].self_attn, model.layers[0].mlp, model.layers[1].shared_experts
        p = "model.layers.1.self_attn."
        rows = slice(r * 2 * 192, (r + 1) * 2 * 192)                        # 2 heads of qk 128 + 64 per rank
        assert torch.equal(fp8_bytes(a.q_b_proj), fp8_bytes(ck[p + "q_b_proj.weight"][rows]))
        assert torch.equal(a.q_b_proj_scale_inv, ck[p + "q_b_proj.weight_scale_inv"][r * 3:(r + 1) * 3])
        assert torch.equal(a.o_proj_scale_inv, ck[p + "o_proj.weight_scale_inv"][:, r * 2:(r + 1) * 2])
        assert torch.equal(a.kv_a_proj_with_mqa_scale_inv, ck[p + "kv_a_proj_with_mqa.weight_scale_inv"])  # 192 rows
        kv_b = slice(r * 512, (r + 1) * 512)
        assert torch.equal(a.w_kv_b, dequantize_blocks(ck[p + "kv_b_proj.weight"], ck[p + "kv_b_proj.weight_scale_inv"],
                                                       128, torch.bfloat16)[kv_b])
        q = "model.layers.0.mlp."
        assert torch.equal(mlp.gate_up_scale_inv, torch.cat([ck[q + "gate_proj.weight_scale_inv"][r * 2:(r + 1) * 2],
                                                             ck[q + "up_proj.weight_scale_inv"][r * 2:(r + 1) * 2]]))
        assert torch.equal(fp8_bytes(mlp.down), fp8_bytes(ck[q + "down_proj.weight"][:, r * 256:(r + 1) * 256]))
        assert torch.equal(shared.down_scale_inv, ck["model.layers.1.mlp.shared_experts.down_proj.weight_scale_inv"]
                           [:, r:r + 1])
        assert a.q_a_layernorm.weight.dtype == model.layers[1].mlp.gate.dtype == torch.bfloat16
    small = make_model("deepseek_v3", tmp_path / "s", fp8=True, dtype="bfloat16", layers=1, hidden=128, heads=2,
                       head_dim=32, rope_head_dim=16, intermediate=128, kv_lora_rank=128, q_lora_rank=128, experts=8,
                       vocab_size=512, first_dense=1)
    with pytest.raises(ValueError, match="does not fall on whole 128x128 blocks"):
        list(_cuda_method_loads(small, 2))
