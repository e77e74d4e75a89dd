"""Kernels.sample, the one-pass sampling kernels: the cpu platform's C kernel picks the tokens of the
numpy reference of its noise (tests/race_reference.py), its draws follow softmax(logits / T) (a
chi-square test over 200,000 draws), the sampler sends temperature-only rows to it (seeded rows with
their request's key, in any batch, in a fresh process and on a restarted server) and the rest to the
torch paths; the cuda platform's Triton kernel, run by Triton's CPU interpreter, picks the C kernel's
tokens. (The GPU run of these checks: tests/test_gpu.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from epplat.core.engine.protocol import EngineRequest, SamplingParams
from epplat.core.engine.request import Request
from epplat.core.engine.sampler import sample
from epplat.platforms.cpu import cpu_kernels
from epplat.platforms.cpu.platform import cpu_kernel_record
from race_reference import race_token

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="the C kernels did not build here")

# chi-square quantile at p = 0.001 for 11 degrees of freedom: a right sampler fails it once in 1,000
# seeds; these seeds are fixed, so the test repeats exactly
CHI2_11_P001 = 31.26


def _req(i, **kw):
    return Request(EngineRequest(request_id=str(i), prompt_token_ids=[1], params=SamplingParams(**kw)))


def _key(seed: int) -> int:
    """The key of a seeded request's first kernel draw (the sampler's rule)."""
    return int(torch.randint(1 << 62, (1,), generator=torch.Generator().manual_seed(seed)))


def test_c_kernel_picks_the_reference_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 20000, generator=g) * 3      # three chunks of 8192, a partial block at the end
    x[1, 19999] = 40.0                              # the last token, in the partial block, wins
    x[2, :19000] = -float("inf")                    # banned tokens never win
    for temperature, keys in ((0.8, 1 << 40), (torch.tensor([0.5, 1.0, 2.0, 1.0, 0.3]),
                                               torch.tensor([7, 1 << 61, 3, 99, 12345678901]))):
        got = cpu_kernels.sample(x, temperature, keys).tolist()
        t = temperature.tolist() if isinstance(temperature, torch.Tensor) else [temperature] * 5
        k = keys.tolist() if isinstance(keys, torch.Tensor) else [keys + i for i in range(5)]
        assert got == [race_token(x[i], t[i], k[i]) for i in range(5)]
        assert got[1] == 19999 and got[2] >= 19000


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_c_kernel_draws_follow_the_softmax(temperature):
    vocab, n = 12, 200000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(1)) * 2
    logits[0, 3] = 8.0                      # a peaked row: most tokens skip the logarithms
    tokens = cpu_kernels.sample(logits.expand(n, vocab).contiguous(), temperature, 1 << 50)
    expected = n * (logits[0].double() / temperature).softmax(-1)
    freq = torch.bincount(tokens, minlength=vocab).double()
    assert ((freq - expected) ** 2 / expected).sum() < CHI2_11_P001


def test_sampler_sends_temperature_rows_to_the_kernel_and_the_rest_to_torch():
    vocab = 3000
    x = torch.randn(6, vocab, generator=torch.Generator().manual_seed(2)) * 3
    reqs = [_req(0, temperature=0.0), _req(1, temperature=0.7, seed=11), _req(2, temperature=1.0, top_k=1),
            _req(3, temperature=1.0, min_p=1.0), _req(4, temperature=1.3, seed=12), _req(5, temperature=1.0, top_p=1e-6)]
    tokens, _ = sample(x, reqs, kernels=cpu_kernel_record())
    best = x.argmax(-1).tolist()
    assert [tokens[i] for i in (0, 2, 3, 5)] == [best[i] for i in (0, 2, 3, 5)]   # greedy and narrowed rows
    assert tokens[1] == race_token(x[1], 0.7, _key(11)) and tokens[4] == race_token(x[4], 1.3, _key(12))
    # a seeded row alone draws what it drew in the batch; unseeded rows take the kernel as well
    assert sample(x[4:5], [_req(4, temperature=1.3, seed=12)], kernels=cpu_kernel_record())[0] == [tokens[4]]
    torch.manual_seed(5)
    base = int(torch.randint(1 << 62, (1,)))
    torch.manual_seed(5)
    plain = sample(x[:3], [_req(i, temperature=0.9) for i in range(3)], kernels=cpu_kernel_record())[0]
    assert plain == [race_token(x[i], 0.9, base + i) for i in range(3)]


_DRAWS = '''
import torch
from epplat.core.engine.protocol import EngineRequest, SamplingParams
from epplat.core.engine.request import Request
from epplat.core.engine.sampler import sample
from epplat.platforms.cpu.platform import cpu_kernel_record
reqs = [Request(EngineRequest(str(s), [1], SamplingParams(temperature=1.0, seed=s))) for s in (3, 4)]
x = torch.randn(2, 5000, generator=torch.Generator().manual_seed(0))
print([sample(x, reqs, kernels=cpu_kernel_record())[0] for _ in range(4)])
'''


def test_seeded_draws_repeat_in_a_fresh_process():
    here = {}
    exec(_DRAWS.replace("print(", "out = ("), here)
    r = subprocess.run([sys.executable, "-c", _DRAWS], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(here["out"]) and len({str(t) for t in here["out"]}) > 1


_INTERPRETED = r'''
import torch
from epplat.platforms.cpu import cpu_kernels
from epplat.platforms.cuda.triton_sample import sample
cpu_kernels.load()
g = torch.Generator().manual_seed(3)
wide = torch.randn(4, 2500, generator=g) * 3
narrow = torch.randn(1, 12, generator=g).expand(48, 12).contiguous() * 2
for x, temperature, keys in ((wide, 0.8, 1 << 40), (narrow, 1.0, 77),
                             (wide, torch.tensor([0.5, 1.0, 2.0, 1.3]), torch.tensor([7, 1 << 61, 3, 12345678901]))):
    got, want = sample(x, temperature, keys).tolist(), cpu_kernels.sample(x, temperature, keys).tolist()
    assert got == want, (got, want)
print("ok")
'''


def test_triton_sample_kernel_in_the_interpreter_picks_the_c_kernels_tokens():
    """The cuda platform's kernel run by Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_a_seed_gives_the_same_tokens_on_a_restarted_server(qwen3_moe_dir):
    """Through the HTTP API and the openai client: float32 on the cpu platform, so temperature-1.0
    requests go to the C kernel; the same seeded request before and after a restart."""
    import openai
    from server_utils import Server

    def draws():
        with Server(str(qwen3_moe_dir), "--dtype", "float32", "--max-model-len", "512") as s:
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
            r = client.completions.create(model=str(qwen3_moe_dir), prompt="The sea", max_tokens=8, temperature=1.0,
                                          n=3, seed=7, extra_body={"ignore_eos": True})
            return [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    first = draws()
    assert draws() == first and len(set(first)) > 1
