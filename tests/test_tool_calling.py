"""Tool calling and reasoning parsers through the real server and the openai client, on the test
checkpoint (random weights) with a chat template that renders tools as Qwen3's does:

- the tools reach the chat template (/tokenize and the chat prompt's token count say so);
- tool_choice required / a named function: the grammar forces the random-weight output into calls
  that parse and validate (the same request with tool_choice none writes no such JSON);
- tool_choice auto with ``--tool-call-parser hermes --reasoning-parser qwen3``: an answer forced
  (by a regex) into Qwen3's format comes back as reasoning_content, content and tool_calls, whole and
  streamed alike (the call's arguments streamed in pieces, the openai client's accumulation of them
  equal to the whole answer's), finish_reason tool_calls; a tool-call round trip goes back through the template;
- /v1/responses with function tools through the openai client: the same answer as reasoning, message
  and function_call items, whole and streamed (vLLM's event sequence: reasoning_text and output_text
  deltas within their content parts, function_call_arguments deltas), a named tool_choice
  forced by the grammar, and the round trip of a function_call and its function_call_output;
- bad tool choices are 400s; a server without --enable-auto-tool-choice refuses auto
  (test_structured_output.py).
"""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from server_utils import Server

TEMPLATE = """{%- if tools %}<|im_start|>system
# Tools

<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

Call a function by writing <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.content %}{{ m.content }}{% endif %}
{%- for tc in m.tool_calls or [] %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments }}}
</tool_call>{% endfor %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CITIES = ["Paris", "Rome", "Oslo"]
WEATHER = {"type": "object", "properties": {"city": {"enum": CITIES}, "days": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
                                           "parameters": TIME}}]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TIGHT = {"structured_outputs": {"disable_any_whitespace": True}}
# Qwen3's answer shape, forced by a regex: a think block, some content, one hermes tool call
QWEN3_ANSWER = (r'<think>[a-z]{1,6}</think>\n\nOK<tool_call>\n\{"name": "get_weather", "arguments": '
                r'\{"city": "(Paris|Rome)", "days": [1-7]\}\}\n</tool_call>')


def valid_call(name: str, arguments: str) -> bool:
    args = json.loads(arguments)
    if name == "get_weather":
        return set(args) == {"city", "days"} and args["city"] in CITIES and type(args["days"]) is int \
            and 1 <= args["days"] <= 7
    return name == "get_time" and args == {"zone": args.get("zone")} and args["zone"] in ("UTC", "CET")


@pytest.fixture(scope="module")
def server(qwen3_moe_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("tools") / "tools.jinja"
    template.write_text(TEMPLATE)
    with Server(str(qwen3_moe_dir), "--dtype", "float32", "--max-model-len", "1024", "--chat-template",
                str(template), "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                "--reasoning-parser", "qwen3") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def closing_bias(qwen3_moe_dir) -> dict[str, float]:
    """Favours the tokens that close the array of calls, so that random weights stop after a few."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    return {str(i): 3.0 for i in range(len(tok)) if tok.decode([i]).strip() in ("]", "}]", "}}]")}


def streamed(stream):
    """A stream's reasoning, content, tool calls (name, arguments, id) by index, and finish reason."""
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in stream:
        for c in chunk.choices:
            d = c.delta
            reasoning += getattr(d, "reasoning_content", None) or ""
            content += d.content or ""
            for tc in d.tool_calls or []:
                call = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
                call["id"] = call["id"] or tc.id
                call["name"] += (tc.function.name or "") if tc.function else ""
                call["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = c.finish_reason or finish
    return reasoning, content, [calls[i] for i in sorted(calls)], finish


def test_tools_reach_the_chat_template(server, client):
    def tokenize(**extra):
        r = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES, **extra})
        assert r.status_code == 200, r.text
        return r.json()
    with_tools, without = tokenize(tools=TOOLS), tokenize()
    text = httpx.post(server.url + "/detokenize", json={"tokens": with_tools["tokens"]}).json()["prompt"]
    assert "# Tools" in text and '"name": "get_weather"' in text and "The time in a zone" in text, text
    assert with_tools["count"] > without["count"]
    r = client.chat.completions.create(model=None, messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=2)
    assert r.usage.prompt_tokens == with_tools["count"]


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_choice_are_forced_by_the_grammar(client, closing_bias, stream):
    def ask(tool_choice, **extra):
        kw = dict(model=None, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, max_tokens=300,
                  temperature=1.0, seed=11, extra_body=TIGHT, **extra)
        if stream:
            _, content, calls, finish = streamed(client.chat.completions.create(stream=True, **kw))
            return content, [(c["name"], c["arguments"], c["id"]) for c in calls], finish
        choice = client.chat.completions.create(**kw).choices[0]
        calls = [(c.function.name, c.function.arguments, c.id) for c in choice.message.tool_calls or []]
        assert all(c.type == "function" for c in choice.message.tool_calls or [])
        return choice.message.content, calls, choice.finish_reason

    content, calls, finish = ask("required", logit_bias=closing_bias)
    assert finish == "tool_calls" and calls and not content, (content, calls, finish)
    assert all(valid_call(name, args) for name, args, _ in calls), calls
    assert len({i for _, _, i in calls}) == len(calls) and all(i.startswith("chatcmpl-tool-") for _, _, i in calls)

    content, calls, finish = ask({"type": "function", "function": {"name": "get_time"}})
    assert finish == "stop" and not content and len(calls) == 1 and calls[0][0] == "get_time", (content, calls)
    assert valid_call(*calls[0][:2]), calls

    content, calls, finish = ask("none")        # the same request unconstrained: no calls, and no such JSON
    assert calls == [] and content and finish == "length"
    assert not re.search(r'"(zone|city)"', content)


def test_auto_tool_choice_parses_hermes_calls_and_qwen3_reasoning(client):
    kw = dict(model=None, messages=MESSAGES, tools=TOOLS, max_tokens=100, temperature=0.0,
              extra_body={"structured_outputs": {"regex": QWEN3_ANSWER}})
    choice = client.chat.completions.create(**kw).choices[0]
    msg = choice.message
    assert choice.finish_reason == "tool_calls"
    assert re.fullmatch("[a-z]{1,6}", msg.reasoning_content) and msg.content == "\n\nOK", msg
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0].function.name == "get_weather"
    assert valid_call("get_weather", msg.tool_calls[0].function.arguments)

    chunks = list(client.chat.completions.create(stream=True, **kw))
    reasoning, content, calls, finish = streamed(chunks)
    assert (reasoning, content, finish) == (msg.reasoning_content, msg.content, "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", msg.tool_calls[0].function.arguments)]
    # vLLM's pieces: the call's first delta has its id, type and name, its arguments follow in pieces;
    # the openai client's own accumulation of the stream gives the whole answer's call
    deltas = [tc for ch in chunks for c in ch.choices for tc in c.delta.tool_calls or []]
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "get_weather"
    assert len(deltas) > 3 and not any(d.id or d.type or d.function.name for d in deltas[1:]), deltas
    state = ChatCompletionStreamState(input_tools=TOOLS)
    for chunk in chunks:
        state.handle_chunk(chunk)
    final = state.get_final_completion().choices[0].message
    assert [(c.id, c.function.name, c.function.arguments) for c in final.tool_calls] == \
        [(deltas[0].id, "get_weather", msg.tool_calls[0].function.arguments)]

    # tool_choice none: the same answer is not parsed for calls (the reasoning still is)
    none = client.chat.completions.create(tool_choice="none", **kw).choices[0]
    assert none.finish_reason == "stop" and not none.message.tool_calls
    assert none.message.reasoning_content == msg.reasoning_content and "<tool_call>" in none.message.content

    # the round trip: the call and its result go back through the chat template
    call = msg.tool_calls[0]
    back = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                       {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sun"}'}]
    again = client.chat.completions.create(model=None, messages=back, tools=TOOLS, max_tokens=4, temperature=0.0)
    assert again.choices[0].finish_reason == "length" and not again.choices[0].message.tool_calls
    assert again.usage.prompt_tokens > choice_prompt_tokens(client)


def choice_prompt_tokens(client) -> int:
    return client.chat.completions.create(model=None, messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                          max_tokens=1).usage.prompt_tokens


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "tools": None}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
])
def test_bad_tool_choices_are_400s(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS, "max_tokens": 2,
                                                              **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith(param) and "\n" not in err["message"], err


def test_responses_api_tools(client):
    """vLLM's Responses API: function tools and tool_choice, function_call output items (and events)."""
    model = client.models.list().data[0].id
    tools = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
              "parameters": t["function"]["parameters"]} for t in TOOLS]
    kw = dict(model=model, input="What is the weather in Paris?", tools=tools, max_output_tokens=100,
              temperature=0.0, extra_body={"structured_outputs": {"regex": QWEN3_ANSWER}})
    chat = client.chat.completions.create(model=None, messages=MESSAGES, tools=TOOLS, max_tokens=100,
                                          temperature=0.0, extra_body=kw["extra_body"]).choices[0].message
    r = client.responses.create(**kw)
    assert [i.type for i in r.output] == ["reasoning", "message", "function_call"] and r.status == "completed"
    assert r.output[0].content[0].text == chat.reasoning_content and r.output_text == chat.content
    call = r.output[2]
    assert (call.name, call.arguments, call.status) == ("get_weather", chat.tool_calls[0].function.arguments,
                                                        "completed")
    assert call.id.startswith("fc_") and call.call_id and [t.name for t in r.tools] == ["get_weather", "get_time"]

    events = list(client.responses.create(stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response
    assert [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in done.output] == \
        [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in r.output]
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 1 and "".join(pieces) == call.arguments
    fc_done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(fc_done) == 1 and fc_done[0].arguments == call.arguments and fc_done[0].output_index == 2
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["reasoning", "message", "function_call"]
    kinds = [e.type.removeprefix("response.") for e in events]       # vLLM's sequence, a run of deltas as one
    kinds = [k for i, k in enumerate(kinds) if not (k.endswith(".delta") and k == kinds[i - 1])]
    part = ["content_part.added", "{}.delta", "{}.done", "content_part.done"]
    assert kinds == ["created", "in_progress", "output_item.added", *(k.format("reasoning_text") for k in part),
                     "output_item.done", "output_item.added", *(k.format("output_text") for k in part),
                     "output_item.done", "output_item.added", "function_call_arguments.delta",
                     "function_call_arguments.done", "output_item.done", "completed"], kinds
    parts = [e.part for e in events if e.type.startswith("response.content_part.")]
    assert [(p.type, p.text) for p in parts] == [("reasoning_text", ""), ("reasoning_text", chat.reasoning_content),
                                                 ("output_text", ""), ("output_text", chat.content)]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == chat.reasoning_content

    named = client.responses.create(model=model, input="The time?", tools=tools, max_output_tokens=60,
                                    temperature=1.0, tool_choice={"type": "function", "name": "get_time"},
                                    extra_body={**TIGHT, "seed": 3})
    calls = [i for i in named.output if i.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_time" and valid_call("get_time", calls[0].arguments), named.output

    back = client.responses.create(model=model, tools=tools, max_output_tokens=4, temperature=0.0, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"forecast": "sun"}'}])
    assert back.status == "incomplete" and back.usage.input_tokens > r.usage.input_tokens
