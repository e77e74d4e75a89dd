"""vLLM's ``mistral`` format (Mistral, Mixtral): ``[TOOL_CALLS]`` then a JSON array of
``{"name": ..., "arguments": {...}}``, after optional content."""

from __future__ import annotations

from epplat.core.server.tool_parsers.base import ParsedCall, ToolParser, json_calls


class MistralToolParser(ToolParser):
    start = "[TOOL_CALLS]"

    def calls(self, tail: str, final: bool) -> list[ParsedCall]:
        text = tail[len(self.start):]
        pos = text.find("[")
        return [] if pos < 0 else json_calls(text, pos + 1, " \t\n\r,", "arguments")
