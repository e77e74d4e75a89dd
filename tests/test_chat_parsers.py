"""Every --tool-call-parser and --reasoning-parser on answers written in its model family's format:
the whole answer's split (content, calls / reasoning_content, content), and the same answer streamed
in random pieces adds up to it: a tool call's first delta has its id, type and name, its arguments
follow in pieces as they are written (vLLM's streaming), adding up to the whole answer's. One
difference, vLLM's too: a call cut off by the end of the output was streamed as far as it went, while
the whole answer has it as content. (The server runs them end to end in test_tool_calling.py.)"""

from __future__ import annotations

import random
from typing import Optional

import pytest

from epplat.core.server.chat_output import ChatOutputs, chat_parsers
from epplat.core.server.protocol import ChatCompletionRequest

TOOLS = [{"type": "function", "function": {"name": n}} for n in ("get_weather", "get_time")]
W = ("get_weather", '{"city": "Paris", "days": 3}')
T = ("get_time", '{"zone": "UTC"}')
CUT_OFF = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'
CUT_OFF_STREAMED = (None, [("get_weather", '{"city": "Pa')])
DS_CALL = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{}\n```json\n{}\n```<｜tool▁call▁end｜>"

# (parser, answer, expected content, expected calls)
TOOL_ANSWERS = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>',
     "Let me check.\n", [W, T]),
    ("hermes", "No tools needed: <tool_ here.", "No tools needed: <tool_ here.", []),
    ("hermes", CUT_OFF, CUT_OFF, []),          # cut off: it stays content (streamed: see CUT_OFF_STREAMED)
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


def run_stream(outputs: ChatOutputs, parts: list[str], pieces_of: Optional[dict] = None):
    """The stream's reasoning, content and calls (name, arguments) by index; pieces_of: the number of
    deltas of each call."""
    stream, reasoning, content, calls = outputs.stream(), None, None, {}
    for k, part in enumerate(parts):
        d = stream.feed(part, k == len(parts) - 1)
        if d is None:
            continue
        if d.reasoning_content is not None:
            reasoning = (reasoning or "") + d.reasoning_content
        if d.content is not None:
            content = (content or "") + d.content
        for c in d.tool_calls or []:
            first = c.index not in calls
            assert (c.id is not None, c.type, c.function.name is not None) == \
                ((True, "function", True) if first else (False, None, False)), (first, c)
            name, args = calls.get(c.index, (c.function.name, ""))
            calls[c.index] = (name, args + (c.function.arguments or ""))
            if pieces_of is not None:
                pieces_of[c.index] = pieces_of.get(c.index, 0) + 1
    assert sorted(calls) == list(range(len(calls)))
    return reasoning, content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("name,answer,content,calls", TOOL_ANSWERS)
def test_tool_parsers(name, answer, content, calls):
    outputs = ChatOutputs(ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                                "tools": TOOLS}),
                          **{k: v for k, v in chat_parsers(True, name, None).items() if k != "enable_auto_tool_choice"})
    whole = outputs.whole(answer)
    assert (whole.content, [(c.function.name, c.function.arguments) for c in whole.tool_calls]) == (content, calls)
    assert outputs.finish_reason(bool(calls), "stop") == ("tool_calls" if calls else "stop")
    expected = CUT_OFF_STREAMED if answer == CUT_OFF else (content, calls)
    rng = random.Random(answer)
    for _ in range(50):
        _, streamed_content, streamed_calls = run_stream(outputs, pieces(answer, rng))
        assert ((streamed_content or None), streamed_calls) == expected
    counts: dict = {}                       # a character at a time: every call's arguments come in pieces
    assert run_stream(outputs, list(answer), counts)[2] == expected[1]
    assert all(counts[i] > 3 for i in range(len(expected[1]))), counts


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
