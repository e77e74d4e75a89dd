"""`vllm serve` command lines (as vLLM's and vllm-ascend's docs write them) with the program name
swapped: each either serves, or fails with one line naming the unsupported part."""

from __future__ import annotations

import json
import shlex
import shutil

import httpx
import openai
import pytest

from server_utils import Server

# (command line from the docs, the model swapped for MODEL; sizes kept small enough for the test checkpoint)
ACCEPTED = [
    # vLLM quickstart
    "vllm serve MODEL --generation-config vllm",
    # vLLM expert-parallel deployment
    "vllm serve MODEL --tensor-parallel-size 1 --data-parallel-size 2 --enable-expert-parallel --trust-remote-code",
    # vllm-ascend Qwen3-MoE tutorial
    "vllm serve MODEL --tensor-parallel-size 2 --enable-expert-parallel --max-model-len 256 "
    "--max-num-batched-tokens 256 --trust-remote-code --gpu-memory-utilization 0.9 "
    "--compilation-config '{\"cudagraph_capture_sizes\":[1,2,4,8]}' --async-scheduling",
    # vLLM production-stack / Kubernetes manifests
    "vllm serve MODEL --trust-remote-code --enable-chunked-prefill --max-num-batched-tokens 1024 "
    "--disable-log-requests --disable-log-stats --distributed-executor-backend mp -pp 1 --swap-space 4",
    "vllm serve MODEL --kv-cache-dtype auto --load-format safetensors --tokenizer-mode auto --max-logprobs 20 "
    "--generation-config auto -O3 --enable-prefix-caching --data-parallel-backend mp",
    # vLLM tool calling and reasoning outputs docs
    "vllm serve MODEL --enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3",
    "vllm serve MODEL --enable-auto-tool-choice --tool-call-parser deepseek_v3 --reasoning-parser deepseek_r1",
]
REFUSED = [
    ("vllm serve MODEL --enable-auto-tool-choice --tool-call-parser qwen3_xml",
     "unknown --tool-call-parser 'qwen3_xml'; available: deepseek_v3, hermes, llama3_json, mistral"),
    ("vllm serve MODEL --reasoning-parser gpt_oss", "unknown --reasoning-parser 'gpt_oss'; available: deepseek_r1"),
    ("vllm serve MODEL --enable-auto-tool-choice", "--enable-auto-tool-choice needs --tool-call-parser"),
    ("vllm serve MODEL --kv-cache-dtype fp8", "--kv-cache-dtype fp8: a KV cache dtype"),
    ("vllm serve MODEL --data-parallel-size 2 --enable-expert-parallel --enable-dbo", "--enable-dbo: dual batch"),
    ("vllm serve MODEL --load-format dummy", "--load-format dummy: epplat loads safetensors"),
    ("vllm serve MODEL --chat-template ./no-such-template.jinja",
     "--chat-template ./no-such-template.jinja: looks like a file path, but it cannot be opened"),
    ("vllm serve MODEL --generation-config ./no-such-folder", "--generation-config ./no-such-folder: no generation"),
    ("vllm serve MODEL --data-parallel-size 2 --data-parallel-hybrid-lb", "--data-parallel-hybrid-lb: hybrid"),
]


def epplat_argv(line: str, model) -> list[str]:
    argv = shlex.split(line.replace("MODEL", str(model)))
    assert argv[0] == "vllm"
    return argv[1:]


@pytest.mark.parametrize("line", ACCEPTED)
def test_vllm_command_lines_are_accepted(line, qwen3_moe_dir, monkeypatch):
    monkeypatch.delenv("EPPLAT_LOG_STATS_INTERVAL", raising=False)    # restored after (--disable-log-stats sets it)
    from epplat.cli import build_parser
    from epplat.serve import engine_config_from_args
    cfg = engine_config_from_args(build_parser().parse_args(epplat_argv(line, qwen3_moe_dir)))
    if cfg.parallel.ipc_dir:
        shutil.rmtree(cfg.parallel.ipc_dir, ignore_errors=True)


@pytest.mark.parametrize("line,message", REFUSED)
def test_vllm_command_lines_that_would_change_results_fail_in_one_line(line, message, qwen3_moe_dir, capsys):
    from epplat.cli import main
    assert main(epplat_argv(line, qwen3_moe_dir)) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"epplat serve: error: {message}"), err


TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"


def test_generation_config_chat_template_tokenizer_and_max_logprobs(qwen3_moe_dir, tmp_path):
    """--generation-config auto applies the checkpoint's sampling defaults (top_k 1: sampling gives the
    greedy text; max_new_tokens 5: the default length); --tokenizer serves a
    checkpoint without tokenizer files; --chat-template (a file) renders chats; --max-logprobs caps
    logprobs and prompt_logprobs."""
    model, tok = tmp_path / "m", tmp_path / "tok"
    shutil.copytree(qwen3_moe_dir, model)
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.move(model / name, tok / name)
    gc = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gc, "top_k": 1, "max_new_tokens": 5}))
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    msgs = [{"role": "user", "content": "hi there"}]
    with Server(str(model), "--tokenizer", str(tok), "--chat-template", str(tmp_path / "t.jinja"),
                "--max-logprobs", "3", "--generation-config", "auto", "--dtype", "float32",
                "--max-model-len", "256") as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        greedy = c.chat.completions.create(model=str(model), messages=msgs, temperature=0, max_tokens=5,
                                           extra_body={"ignore_eos": True})
        sampled = c.chat.completions.create(model=str(model), messages=msgs, temperature=1.0, n=3, seed=1,
                                            extra_body={"ignore_eos": True})
        assert [ch.message.content for ch in sampled.choices] == [greedy.choices[0].message.content] * 3
        assert sampled.usage.completion_tokens == 15
        rendered = httpx.post(s.url + "/tokenize", json={"messages": msgs, "add_generation_prompt": True}).json()
        from transformers import AutoTokenizer
        t = AutoTokenizer.from_pretrained(tok)
        assert rendered["tokens"] == t.encode("[user] hi there\n[assistant]", add_special_tokens=False)
        assert c.completions.create(model=str(model), prompt="a", max_tokens=2, logprobs=3).choices[0].logprobs
        for body in ({"logprobs": 4}, {"prompt_logprobs": 4}):
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2, **body})
            assert r.status_code == 400 and "max allowed: 3" in r.json()["error"]["message"], r.text
        assert "generation config recommended from the model creator" in s.output()


def test_a_vllm_command_line_serves(qwen3_moe_dir):
    argv = epplat_argv(ACCEPTED[3], qwen3_moe_dir)[2:]
    with Server(str(qwen3_moe_dir), *argv, "--dtype", "float32", "--max-model-len", "256",
                env={"EPPLAT_LOG_STATS_INTERVAL": "0"}) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        assert c.completions.create(model=str(qwen3_moe_dir), prompt="hi", max_tokens=3).usage.completion_tokens == 3
        assert "--trust-remote-code: accepted (epplat runs its own implementation" in s.output()
        assert "Avg prompt throughput" not in s.output()     # --disable-log-stats, as in vLLM
