"""vLLM's ``mistral`` format (Mistral, Mixtral): ``[TOOL_CALLS]`` then a JSON array of
``{"name": ..., "arguments": {...}}``, after optional content."""

from __future__ import annotations

from typing import Optional

from epplat.core.server.tool_parsers.base import ParsedCall, ToolParser, json_calls, next_json_call


class MistralToolParser(ToolParser):
    start = "[TOOL_CALLS]"

    def calls(self, tail: str, final: bool) -> list[ParsedCall]:
        text = tail[len(self.start):]
        pos = text.find("[")
        return [] if pos < 0 else json_calls(text, pos + 1, " \t\n\r,", "arguments")

    def partial(self, tail: str, done: int) -> Optional[tuple[str, str]]:
        text = tail[len(self.start):]
        pos = text.find("[")
        return None if pos < 0 else next_json_call(text, pos + 1, " \t\n\r,", ("arguments",), done)
