"""Every --tool-call-parser and --reasoning-parser on answers written in its model family's format:
the whole answer's split (content, calls / reasoning_content, content), and the same answer streamed
in random pieces adds up to it. (The server runs them end to end in test_tool_calling.py.)"""

from __future__ import annotations

import random

import pytest

from epplat.core.server.chat_output import ChatOutputs, chat_parsers
from epplat.core.server.protocol import ChatCompletionRequest

TOOLS = [{"type": "function", "function": {"name": n}} for n in ("get_weather", "get_time")]
W = ("get_weather", '{"city": "Paris", "days": 3}')
T = ("get_time", '{"zone": "UTC"}')
DS_CALL = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{}\n```json\n{}\n```<｜tool▁call▁end｜>"

# (parser, answer, expected content, expected calls)
TOOL_ANSWERS = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>',
     "Let me check.\n", [W, T]),
    ("hermes", "No tools needed: <tool_ here.", "No tools needed: <tool_ here.", []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', '<tool_call>\n{"name": '
               '"get_weather", "arguments": {"city": "Pa', []),          # cut off: it stays content
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}; '
                    '{"name": "get_time", "parameters": {"zone": "UTC"}}', None, [W, T]),
    ("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}', None, [T]),
    ("llama3_json", 'The answer is {"a": 1}', 'The answer is {"a": 1}', []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, '
                '{"name": "get_time", "arguments": {"zone": "UTC"}}]', None, [W, T]),
    ("mistral", 'Sure. [TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "UTC"}}]', "Sure. ", [T]),
    ("deepseek_v3", "I will look.<｜tool▁calls▁begin｜>" + DS_CALL.format(*W) + DS_CALL.format(*T)
     + "<｜tool▁calls▁end｜>", "I will look.", [W, T]),
    ("deepseek_v3", "Plain text.", "Plain text.", []),
]

# (parser, answer, expected reasoning_content, expected content)
REASONING_ANSWERS = [
    ("qwen3", "<think>\nFirst, the city.\n</think>\n\nParis.", "\nFirst, the city.\n", "\n\nParis."),
    ("qwen3", "Paris, without thinking.", None, "Paris, without thinking."),
    ("qwen3", "<think></think>Paris.", "", "Paris."),
    ("deepseek_r1", "The user asks about Paris.</think>It is sunny.", "The user asks about Paris.", "It is sunny."),
    ("deepseek_r1", "<think>Hmm.</think>Sunny.", "Hmm.", "Sunny."),
    ("deepseek_r1", "Still thinking about it", "Still thinking about it", None),
]


def pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 40))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def run_stream(outputs: ChatOutputs, parts: list[str]):
    stream, reasoning, content, calls = outputs.stream(), None, None, []
    for k, part in enumerate(parts):
        d = stream.feed(part, k == len(parts) - 1)
        if d is None:
            continue
        if d.reasoning_content is not None:
            reasoning = (reasoning or "") + d.reasoning_content
        if d.content is not None:
            content = (content or "") + d.content
        calls += [(c.function.name, c.function.arguments) for c in d.tool_calls or []]
    return reasoning, content, calls


@pytest.mark.parametrize("name,answer,content,calls", TOOL_ANSWERS)
def test_tool_parsers(name, answer, content, calls):
    outputs = ChatOutputs(ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                                "tools": TOOLS}),
                          **{k: v for k, v in chat_parsers(True, name, None).items() if k != "enable_auto_tool_choice"})
    whole = outputs.whole(answer)
    assert (whole.content, [(c.function.name, c.function.arguments) for c in whole.tool_calls]) == (content, calls)
    assert outputs.finish_reason(bool(calls), "stop") == ("tool_calls" if calls else "stop")
    rng = random.Random(answer)
    for _ in range(50):
        _, streamed_content, streamed_calls = run_stream(outputs, pieces(answer, rng))
        assert streamed_calls == calls
        assert (streamed_content or None) == content


@pytest.mark.parametrize("name,answer,reasoning,content", REASONING_ANSWERS)
def test_reasoning_parsers(name, answer, reasoning, content):
    outputs = ChatOutputs(ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}]}),
                          None, chat_parsers(False, None, name)["reasoning_parser"])
    whole = outputs.whole(answer)
    assert (whole.reasoning_content, whole.content) == (reasoning, content)
    rng = random.Random(answer)
    for _ in range(50):
        r, c, _ = run_stream(outputs, pieces(answer, rng))
        assert (r or "", c) == (reasoning or "", content)


@pytest.mark.parametrize("flags,message", [
    ((True, None, None), "--enable-auto-tool-choice needs --tool-call-parser"),
    ((True, "pythonic", None), "unknown --tool-call-parser 'pythonic'"),
    ((False, None, "granite"), "unknown --reasoning-parser 'granite'"),
])
def test_unknown_parsers_are_one_line_errors(flags, message):
    with pytest.raises(ValueError, match=message):
        chat_parsers(*flags)
