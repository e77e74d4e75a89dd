"""What every tool-call parser (vLLM's --tool-call-parser) is: where a model's tool calls begin in its
text, and the complete calls in the text from there on.

A parser implements two small methods (and a third, ``partial``, for the call being written, whose
arguments then stream in pieces as vLLM's do); the splitting of a whole answer into content and calls,
and of a streamed answer into content deltas and tool-call deltas, is the same for every format
(``split`` and ``ToolCallStream``), so the formats cannot drift apart between streaming and not.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Optional

from epplat.core.server.tool_parsers.arguments_prefix import json_call_prefix


@dataclass
class ParsedCall:
    """One tool call as the model wrote it: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


def tool_call_id() -> str:
    """vLLM's id for a tool call."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def arguments_json(args) -> str:
    """Arguments as the response carries them: JSON text (a string a model wrote stays as it is)."""
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


_decode = json.JSONDecoder().raw_decode


def json_calls(text: str, pos: int, separators: str, *argument_keys: str) -> list[ParsedCall]:
    """The complete JSON objects {"name": ..., KEY: {...}} written one after another from text[pos:]
    (separated by any of `separators`; a "]" ends them), each as soon as it is complete."""
    return json_calls_to(text, pos, separators, argument_keys)[0]


def json_calls_to(text: str, pos: int, separators: str, argument_keys) -> tuple[list[ParsedCall], int]:
    """``json_calls`` and where the text after them begins (the next call, if one is being written)."""
    out: list[ParsedCall] = []
    while True:
        while pos < len(text) and text[pos] in separators:
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return out, pos
        try:
            call, end = _decode(text, pos)
            args = next((call[k] for k in argument_keys if k in call), {})
            out.append(ParsedCall(call["name"], arguments_json(args)))
            pos = end
        except (ValueError, KeyError, TypeError):
            return out, pos


def next_json_call(text: str, pos: int, separators: str, argument_keys, done: int) -> Optional[tuple[str, str]]:
    """``ToolParser.partial`` for calls written as ``json_calls``: the one after the first ``done``."""
    calls, pos = json_calls_to(text, pos, separators, argument_keys)
    if len(calls) != done or text[pos:pos + 1] == "]":
        return None
    return json_call_prefix(text[pos:], tuple(argument_keys))


def held_back(text: str, marker: str) -> int:
    """How many of text's last characters could be the beginning of `marker` (not to be sent yet)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ToolParser:
    """One model family's tool-call format. Subclasses set `start` or override `find_start`, and
    implement `calls`."""

    start = ""                 # the text that opens the tool calls
    skip_special_tokens = False   # the markers are special tokens in the model's vocabulary: keep them

    def find_start(self, text: str, final: bool) -> Optional[int]:
        """Where the tool calls begin in `text` (None: not, or not yet); with final, text is whole."""
        i = text.find(self.start)
        return None if i < 0 else i

    def hold(self, text: str) -> int:
        """Characters at the end of content text that must wait: they may begin the tool calls."""
        return held_back(text, self.start)

    def calls(self, tail: str, final: bool) -> list[ParsedCall]:
        """The complete calls in `tail` (the text from find_start on), in order; with final, tail is
        whole and anything parseable counts."""
        raise NotImplementedError

    def partial(self, tail: str, done: int) -> Optional[tuple[str, str]]:
        """The call after the first `done` complete calls of `tail` while it is being written: its name
        (once whole) and a prefix of the arguments it will have when complete. None: not begun (or a
        format that sends each call whole)."""
        return None


def split(parser: ToolParser, text: str) -> tuple[Optional[str], list[ParsedCall]]:
    """A whole answer as (content, calls); an answer whose calls do not parse is all content."""
    i = parser.find_start(text, True)
    calls = parser.calls(text[i:], True) if i is not None else []
    if not calls:
        return text, []
    return (text[:i] if text[:i].strip() else None), calls


@dataclass
class CallDelta:
    """A piece of a streamed tool call: the call's index; its name on the call's first piece only."""

    index: int
    name: Optional[str]
    arguments: str


class ToolCallStream:
    """One streamed choice through a parser: feed it text deltas, get back (content, call pieces). A
    call's first piece carries its name, then its arguments follow in pieces (those the parser's
    ``partial`` is sure of), adding up to the complete call's."""

    def __init__(self, parser: ToolParser):
        self.parser, self.text, self.sent, self.start = parser, "", 0, None
        self.num_done = 0              # complete calls, every piece sent
        self.open: Optional[str] = None    # arguments sent of the call being written (None: none begun)

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[CallDelta]]:
        self.text += delta
        p = self.parser
        content = ""
        if self.start is None:
            self.start = p.find_start(self.text, final)
            end = self.start if self.start is not None else len(self.text) - (0 if final else p.hold(self.text))
            content, self.sent = self.text[self.sent:max(end, self.sent)], max(end, self.sent)
        if self.start is None:
            return content, []
        tail = self.text[self.start:]
        calls = p.calls(tail, final)
        pieces = [piece for c in calls[self.num_done:] for piece in self._advance(c.name, c.arguments, True)]
        being_written = p.partial(tail, self.num_done)
        if being_written is not None:
            pieces += self._advance(*being_written, False)
        if final and not calls and self.open is None:   # it looked like tool calls but none parsed: content
            content += self.text[self.sent:]
        return content, pieces

    def _advance(self, name: str, arguments: str, complete: bool) -> list[CallDelta]:
        first = self.open is None
        sent = "" if first else self.open
        new = arguments[len(sent):] if arguments.startswith(sent) else ""
        index = self.num_done
        self.open = None if complete else sent + new
        self.num_done += complete
        if not (first or new):
            return []
        return [CallDelta(index, name if first else None, new)]
