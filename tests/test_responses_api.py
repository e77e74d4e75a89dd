"""/v1/responses through the openai client against the real server: the same greedy text as the chat
completion of the same conversation (string input, message items, instructions), vLLM's event
stream, text.format json_schema through the grammar, and 400s for what is not supported (tools on
a server without --enable-auto-tool-choice among them: tools are tested in test_tool_calling.py)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from server_utils import Server


@pytest.fixture(scope="module")
def server(qwen3_moe_dir):
    with Server(str(qwen3_moe_dir), "--dtype", "float32", "--max-model-len", "1024",
                "--served-model-name", "m") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def chat_text(client, messages, n):
    c = client.chat.completions.create(model="m", messages=messages, max_tokens=n, temperature=0,
                                       extra_body={"ignore_eos": True})
    return c.choices[0].message.content, c.usage.prompt_tokens


def test_responses_equal_chat_completions(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    want, prompt_tokens = chat_text(client, msgs, 8)
    r = client.responses.create(model="m", instructions="Be brief.", input="Name a colour.", max_output_tokens=8,
                                temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == want and r.output[0].role == "assistant"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == prompt_tokens and r.usage.output_tokens == 8
    items = [{"role": "system", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]}]
    r2 = client.responses.create(model="m", input=items, max_output_tokens=8, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert r2.output_text == want


def test_streamed_response_events(client):
    want, _ = chat_text(client, [{"role": "user", "content": "Go on"}], 10)
    events = list(client.responses.create(model="m", input="Go on", max_output_tokens=10, temperature=0, stream=True,
                                          extra_body={"ignore_eos": True}))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want
    assert events[-1].response.output_text == want and events[-1].response.usage.output_tokens == 10


def test_text_format_json_schema(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 9,
                                                                                 "minimum": 0}},
              "required": ["ok", "n"], "additionalProperties": False}
    r = client.responses.create(model="m", input="json please", max_output_tokens=60, temperature=1.0,
                                text={"format": {"type": "json_schema", "name": "x", "schema": schema}},
                                extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    doc = json.loads(r.output_text)
    assert set(doc) == {"ok", "n"} and type(doc["ok"]) is bool and 0 <= doc["n"] <= 9


@pytest.mark.parametrize("body", [
    {"input": "x", "previous_response_id": "resp_1"},
    {"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {}}]},
    {"input": [{"type": "function_call_output", "call_id": "c"}]},
    {"input": "x", "tools": [{"type": "web_search"}], "tool_choice": "none"},
    {"input": [{"type": "reasoning", "summary": []}]},
    {"input": [{"role": "user", "content": 5}]},
    {"input": []},
    {"input": "x", "max_output_tokens": 0},
    {"input": "x", "temperature": -1},
])
def test_unsupported_or_malformed_requests_are_400s(server, body):
    r = httpx.post(server.url + "/v1/responses", json={"model": "m", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]
