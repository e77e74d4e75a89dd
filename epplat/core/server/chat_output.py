"""A chat answer's text as vLLM's chat response has it: ``reasoning_content`` split off by the
--reasoning-parser, then tool calls taken out of the content, by the request's tool_choice:

auto      the --tool-call-parser finds the calls the model chose to write (finish_reason tool_calls);
required  the output was constrained to a JSON array of {"name", "parameters"} (tool_calls.py);
named     the output was constrained to the function's arguments;
none      the content is the answer.

``whole`` does this for a finished answer, ``ChatOutputStream`` for its deltas, with the same
parsers, so a streamed answer adds up to the whole one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from epplat.core.server.protocol import (
    ChatCompletionRequest, DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall, ToolCall)
from epplat.core.server.tool_parsers.base import (
    CallDelta, ParsedCall, ToolCallStream, json_calls, split, tool_call_id)


@dataclass
class ChatOutput:
    """What a chat choice's message says."""

    reasoning_content: Optional[str] = None
    content: Optional[str] = None
    tool_calls: list[ToolCall] = field(default_factory=list)


def _tool_call(call: ParsedCall) -> ToolCall:
    return ToolCall(id=tool_call_id(), function=FunctionCall(name=call.name, arguments=call.arguments))


def required_calls(text: str, final: bool) -> list[ParsedCall]:
    """The complete items of tool_choice required's JSON array, each as soon as it is written."""
    pos = text.find("[")
    return [] if pos < 0 else json_calls(text, pos + 1, " \t\n\r,", "parameters")


class ChatOutputs:
    """The server's parsers (either may be None) applied to one request's choices."""

    def __init__(self, req: ChatCompletionRequest, tool_parser, reasoning_parser):
        self.mode = req.tool_mode
        self.named = req.tool_choice.function.name if self.mode == "named" else None
        self.tool_parser = tool_parser if self.mode == "auto" else None
        self.reasoning = reasoning_parser

    def whole(self, text: str) -> ChatOutput:
        out = ChatOutput(content=text)
        if self.reasoning is not None:
            out.reasoning_content, out.content = self.reasoning.split(text)
        content = out.content or ""
        if self.mode == "named":
            out.content, out.tool_calls = "", [_tool_call(ParsedCall(self.named, content))]
        elif self.mode == "required":
            out.content, out.tool_calls = "", [_tool_call(c) for c in required_calls(content, True)]
        elif self.tool_parser is not None and content:
            out.content, calls = split(self.tool_parser, content)
            out.tool_calls = [_tool_call(c) for c in calls]
        return out

    def finish_reason(self, tool_calls: bool, reason: Optional[str]) -> Optional[str]:
        """vLLM's: tool_calls when the model called tools of its own choice (auto) or as required."""
        if tool_calls and reason == "stop" and self.mode in ("auto", "required"):
            return "tool_calls"
        return reason

    def stream(self) -> "ChatOutputStream":
        return ChatOutputStream(self)


class ChatOutputStream:
    """One streamed choice: text deltas in, DeltaMessages out (None when nothing is ready yet)."""

    def __init__(self, outputs: ChatOutputs):
        self.o = outputs
        self.reasoning = outputs.reasoning.stream() if outputs.reasoning is not None else None
        self.tools = ToolCallStream(outputs.tool_parser) if outputs.tool_parser is not None else None
        self.buffer = ""          # required: the JSON array so far
        self.num_calls = 0        # calls begun
        self.call_ids: list[str] = []
        self.named_id: Optional[str] = None

    def feed(self, delta: str, final: bool) -> Optional[DeltaMessage]:
        reasoning, content = self.reasoning.feed(delta, final) if self.reasoning is not None else ("", delta)
        calls: list[DeltaToolCall] = []
        if self.o.mode == "named":
            if content or (final and self.named_id is None):
                first = self.named_id is None
                self.named_id = self.named_id or tool_call_id()
                calls.append(DeltaToolCall(index=0, id=self.named_id if first else None,
                                           type="function" if first else None,
                                           function=DeltaFunctionCall(name=self.o.named if first else None,
                                                                      arguments=content)))
            content = ""
        elif self.o.mode == "required":
            self.buffer += content
            found = required_calls(self.buffer, final)
            calls = [self._delta(CallDelta(i, c.name, c.arguments))
                     for i, c in enumerate(found[self.num_calls:], self.num_calls)]
            content = ""
        elif self.tools is not None:
            content, pieces = self.tools.feed(content, final)
            calls = [self._delta(piece) for piece in pieces]
        if not (reasoning or content or calls):
            return None
        return DeltaMessage(reasoning_content=reasoning or None, content=content or None, tool_calls=calls or None)

    def _delta(self, piece: CallDelta) -> DeltaToolCall:
        """vLLM's pieces: a call's first has its id, type and name, the others more of its arguments."""
        first = piece.name is not None
        if first:
            self.num_calls += 1
            self.call_ids.append(tool_call_id())
        return DeltaToolCall(index=piece.index, id=self.call_ids[piece.index] if first else None,
                             type="function" if first else None,
                             function=DeltaFunctionCall(name=piece.name, arguments=piece.arguments))

    @property
    def called(self) -> bool:
        return self.num_calls > 0 or self.named_id is not None


def chat_parsers(enable_auto_tool_choice: bool, tool_call_parser: Optional[str],
                 reasoning_parser: Optional[str]) -> dict:
    """The flags' parsers, as OpenAIServing's keywords; ConfigError / PluginError with one line."""
    from epplat.config import ConfigError
    from epplat.plugins import registry
    if enable_auto_tool_choice and tool_call_parser is None:
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser (the model's tool-call format)")
    tools = registry().load("tool_parser", tool_call_parser)() if tool_call_parser is not None else None
    reasoning = registry().load("reasoning_parser", reasoning_parser)() if reasoning_parser is not None else None
    return {"tool_parser": tools, "enable_auto_tool_choice": enable_auto_tool_choice, "reasoning_parser": reasoning}
