"""vLLM's ``llama3_json`` format (Llama 3.1-3.3): the answer is one or more JSON objects
``{"name": ..., "parameters": {...}}`` separated by ``;``, optionally after ``<|python_tag|>``;
an answer that starts otherwise is content."""

from __future__ import annotations

from typing import Optional

from epplat.core.server.tool_parsers.base import ParsedCall, ToolParser, json_calls, next_json_call

_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    start = _TAG

    def find_start(self, text: str, final: bool) -> Optional[int]:
        s = text.lstrip()
        if s.startswith((_TAG, "{")):
            return len(text) - len(s)
        return None

    def hold(self, text: str) -> int:
        s = text.lstrip()      # until its first character, an answer may still become a tool call
        return len(text) if not s or _TAG.startswith(s) else 0

    def calls(self, tail: str, final: bool) -> list[ParsedCall]:
        return json_calls(_calls_text(tail), 0, _SEPARATORS, *_KEYS)

    def partial(self, tail: str, done: int) -> Optional[tuple[str, str]]:
        return next_json_call(_calls_text(tail), 0, _SEPARATORS, _KEYS, done)


_SEPARATORS, _KEYS = " \t\n\r;", ("parameters", "arguments")


def _calls_text(tail: str) -> str:
    text = tail.lstrip()
    return text[len(_TAG):] if text.startswith(_TAG) else text
