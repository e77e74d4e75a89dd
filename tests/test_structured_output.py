"""Structured output through xgrammar, with the real server and the openai client: response_format
json_schema / json_object and vLLM's structured_outputs (json, regex, choice, grammar). The
checkpoint has random weights, so what it writes parses and validates only because the grammar
forces it; the same requests without a constraint do not parse (checked too). Constrained and
unconstrained requests, greedy and sampled, run in one batch; malformed constraints are 400s.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest

from server_utils import Server

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                         "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}
REGEX = r"[A-Z][a-z]{2,5}-[0-9]{3}"
CHOICES = ["red alert", "green", "blue sky"]
GRAMMAR = 'root ::= "(" num ("+" num)? ("*" num)? ")"\nnum ::= [1-9] [0-9]?'
GRAMMAR_RE = r"\([1-9][0-9]?(\+[1-9][0-9]?)?(\*[1-9][0-9]?)?\)"


def valid(doc) -> bool:
    """SCHEMA's rules, written out."""
    return (isinstance(doc, dict) and set(doc) <= {"name", "age", "tags", "ok"} and {"name", "age", "ok"} <= set(doc)
            and isinstance(doc["name"], str) and len(doc["name"]) <= 6
            and type(doc["age"]) is int and 0 <= doc["age"] <= 120 and type(doc["ok"]) is bool
            and (isinstance(doc.get("tags", []), list) and len(doc.get("tags", [])) <= 3
                 and all(t in "abc" for t in doc.get("tags", []))))


def closing(model_dir) -> dict[str, float]:
    """logit_bias favouring the tokens that close a JSON string or object."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    return {str(i): 4.0 for i in range(len(tok)) if tok.decode([i]).strip() in ('"', '}', '"}', '",', '"]')}


@pytest.fixture(scope="module")
def server(qwen3_moe_dir):
    with Server(str(qwen3_moe_dir), "--dtype", "float32", "--max-model-len", "1024") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_outputs_follow_their_grammar_in_one_batch(server, qwen3_moe_dir):
    # random weights write whitespace as readily as anything else: without vLLM's disable_any_whitespace
    # JSON could run to max_tokens in whitespace
    tight = {"structured_outputs": {"disable_any_whitespace": True}}
    constraints = {
        "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
                        **tight},
        # any object: its strings end only when the model picks a quote; a bias makes that likely
        "json_object": {"response_format": {"type": "json_object"}, **tight, "logit_bias": closing(qwen3_moe_dir)},
        "json": {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
        "regex": {"structured_outputs": {"regex": REGEX}},
        "choice": {"structured_outputs": {"choice": CHOICES}},
        "grammar": {"structured_outputs": {"grammar": GRAMMAR}},
        "free": {},
    }

    def ok(kind, text):
        if kind in ("json_schema", "json"):
            try:
                return valid(json.loads(text))
            except ValueError:
                return False
        if kind == "json_object":
            try:
                return isinstance(json.loads(text), dict)
            except ValueError:
                return False
        return {"regex": lambda t: re.fullmatch(REGEX, t), "choice": lambda t: t in CHOICES,
                "grammar": lambda t: re.fullmatch(GRAMMAR_RE, t), "free": lambda t: True}[kind](text) is not None \
            and (kind != "choice" or text in CHOICES)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as c:
            async def one(kind, temperature, chat):
                body = {"max_tokens": 300, "temperature": temperature, "seed": 3, **constraints[kind]}
                if chat:
                    r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Who?"}],
                                                                   **body})
                    assert r.status_code == 200, r.text
                    choice = r.json()["choices"][0]
                    return kind, choice["message"]["content"], choice["finish_reason"]
                r = await c.post("/v1/completions", json={"prompt": "Person:", **body})
                assert r.status_code == 200, r.text
                choice = r.json()["choices"][0]
                return kind, choice["text"], choice["finish_reason"]
            jobs = [one(k, t, chat) for k in constraints for t, chat in ((0.0, False), (1.0, True), (1.0, False))]
            return await asyncio.gather(*jobs)
    results = asyncio.run(run())
    bad = [(kind, text, finish) for kind, text, finish in results
           if kind != "free" and not (finish == "stop" and ok(kind, text))]
    assert bad == [], [(kind, finish, text[:80]) for kind, text, finish in bad]
    # without a grammar this checkpoint writes no JSON, nor anything the regex or choices allow
    free = [text for kind, text, _ in results if kind == "free"]
    assert not any(ok(k, t) for t in free for k in ("json_object", "regex", "choice", "grammar"))


def test_streamed_structured_output(client):
    stream = client.chat.completions.create(model=None, messages=[{"role": "user", "content": "x"}], max_tokens=400,
                                            temperature=1.0, seed=5, stream=True,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "p", "schema": SCHEMA}},
                                            extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert valid(json.loads(text)), text


@pytest.mark.parametrize("body", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
    {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
    {"response_format": {"type": "yaml"}},
    {"structured_outputs": {"regex": "(["}},
    {"structured_outputs": {"grammar": "root ::= "}},
    {"structured_outputs": {"choice": []}},
    {"structured_outputs": {"regex": "a", "choice": ["b"]}},
    {"structured_outputs": {"json": "{not json"}},
    {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
])
def test_malformed_constraints_are_400s(server, client, body):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert msg and "\n" not in msg
    assert client.completions.create(model=None, prompt="ok?", max_tokens=2).usage.completion_tokens >= 1


def test_auto_tool_choice_needs_the_flags(server):
    """vLLM's rule: tools (tool_choice auto, their default) need --enable-auto-tool-choice and a parser;
    this server has neither (test_tool_calling.py's has both)."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra in ({}, {"tool_choice": "auto"}):
        r = httpx.post(server.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "x"}], "tools": tools, "max_tokens": 2, **extra})
        assert r.status_code == 400 and "--enable-auto-tool-choice" in r.json()["error"]["message"], r.text


def big_schema(fields: int) -> dict:
    """A schema that takes xgrammar a while to compile (patterns on many fields)."""
    return {"type": "object", "properties": {f"f{i}": {"type": "string", "pattern": "[a-z]{3,%d}" % (5 + i % 7)}
                                             for i in range(fields)},
            "required": [f"f{i}" for i in range(fields)]}


def test_a_long_compile_does_not_delay_a_running_stream(server):
    """The grammar compiles beside the engine loop: a stream running meanwhile keeps getting its
    tokens while a request with a big schema waits for its compile (the stream's longest gap stays
    well below the wait, a margin wide enough for a loaded machine's hiccups); compiled on the loop,
    the stream would stall for the whole compile. Schemas grow until the wait is two seconds."""
    import threading
    import time
    small = {"prompt": "x", "max_tokens": 1, "response_format": {"type": "json_object"}}
    assert httpx.post(server.url + "/v1/completions", json=small, timeout=300).status_code == 200  # compiler ready
    arrivals: list[float] = []
    trials: list[dict] = []

    def constrained(fields: int, done: dict):
        done["sent"] = time.monotonic()
        r = httpx.post(server.url + "/v1/completions", timeout=300,
                       json={"prompt": "x", "max_tokens": 1, "response_format": {
                           "type": "json_schema", "json_schema": {"name": "big", "schema": big_schema(fields)}}})
        done.update(end=time.monotonic(), status=r.status_code)

    with httpx.Client(base_url=server.url, timeout=300) as c, \
            c.stream("POST", "/v1/completions", json={"prompt": "Once", "max_tokens": 1000, "ignore_eos": True,
                                                      "stream": True}) as stream:
        fields, thread = 4800, None     # 2,400 compiled in 1.5 s on a quiet machine
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
            if len(arrivals) >= 5 and (thread is None or "end" in trials[-1]):
                if thread is not None:
                    thread.join()
                    if trials[-1]["end"] - trials[-1]["sent"] >= 2.0 or len(trials) == 3:
                        break
                    fields *= 2
                trials.append({})
                thread = threading.Thread(target=constrained, args=(fields, trials[-1]))
                thread.start()
        thread.join()
    waits = [t["end"] - t["sent"] for t in trials]
    assert all(t["status"] == 200 for t in trials) and waits[-1] >= 2.0, waits    # a compile took its time
    sent, end = trials[-1]["sent"], trials[-1]["end"]
    during = [a for a in arrivals if sent <= a <= end]
    gap = max(b - a for a, b in zip(arrivals, arrivals[1:]) if b >= sent and a <= end)
    assert len(during) >= 5 and gap < waits[-1] / 2, (waits, gap, len(during))


def test_the_bitmask_bans_what_xgrammar_bans(qwen3_moe_dir):
    """In-process, one batch of five rows of which three are constrained (different places in their
    grammars): the step's bitmask, applied by torch ops and by the cpu platform's C kernel,
    bans exactly what xgrammar's own apply_token_bitmask_inplace bans, leaves the other rows as they
    are, and the sampled tokens are inside the grammars."""
    import torch
    import xgrammar as xgr

    from epplat.core.engine.protocol import EngineRequest, SamplingParams, StructuredOutput
    from epplat.core.engine.request import Request
    from epplat.core.engine.sampler import sample
    from epplat.core.engine.structured_output import Grammars, apply_grammars, fill_bitmask
    from epplat.platforms.cpu.platform import cpu_kernel_record
    vocab = 2048
    grammars = Grammars(str(qwen3_moe_dir), vocab)
    specs = [StructuredOutput("json", json.dumps(SCHEMA)), None, StructuredOutput("regex", REGEX), None,
             StructuredOutput("grammar", GRAMMAR)]
    reqs = []
    for i, spec in enumerate(specs):
        r = Request(EngineRequest(str(i), [1], SamplingParams(structured_output=spec), eos_token_ids=[2]))
        if spec is not None:
            r.grammar = grammars.matcher(spec, [2])
        reqs.append(r)
    for prefix, r in zip(('{"name": "ab', '', 'Ab', '', '(12+'), reqs):
        if prefix:
            assert r.grammar.accept_string(prefix)
    logits = torch.randn(len(reqs), vocab, generator=torch.Generator().manual_seed(0))
    ref = logits.clone()
    mask = xgr.allocate_token_bitmask(len(reqs), vocab)
    for i in (0, 2, 4):
        reqs[i].grammar.fill_next_token_bitmask(mask, i)
    xgr.apply_token_bitmask_inplace(ref, mask, indices=[0, 2, 4])
    got = apply_grammars(logits, reqs, fill_bitmask(reqs, vocab))
    assert torch.equal(got, ref) and torch.isinf(got[[0, 2, 4]]).any(dim=1).all()
    assert not torch.equal(got, logits) and torch.equal(got[[1, 3]], logits[[1, 3]])
    assert torch.equal(apply_grammars(logits[:1], reqs[:1]), ref[:1])     # every row constrained, filled here
    # the cpu platform's C kernel on the packed words, in place, over a vocabulary that is not a multiple
    # of 32 (the last word's tail), and with every row constrained
    kernels = cpu_kernel_record()
    assert kernels.apply_bitmask is not None
    for v in (vocab, vocab - 7):
        bm = fill_bitmask(reqs, v)
        mine = logits[:, :v].contiguous()
        assert apply_grammars(mine, reqs, bm, kernels, inplace=True) is mine
        want = apply_grammars(logits[:, :v].contiguous(), reqs, bm)      # the torch path
        assert torch.equal(mine, want) and (v < vocab or torch.equal(mine, ref))
    every = [reqs[i] for i in (0, 2, 4)]
    assert torch.equal(apply_grammars(logits[[0, 2, 4]], every, fill_bitmask(every, vocab), kernels), ref[[0, 2, 4]])
    tokens, _ = sample(logits, reqs, fill_bitmask(reqs, vocab))
    assert all(reqs[i].grammar.accept_token(tokens[i]) for i in (0, 2, 4))
