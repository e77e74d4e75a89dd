"""vLLM's ``hermes`` format (Qwen2.5, Qwen3, Hermes): each call is
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, after optional content."""

from __future__ import annotations

import json
import re

from typing import Optional

from epplat.core.server.tool_parsers.arguments_prefix import json_call_prefix
from epplat.core.server.tool_parsers.base import ParsedCall, ToolParser, arguments_json

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


class HermesToolParser(ToolParser):
    start = "<tool_call>"

    def calls(self, tail: str, final: bool) -> list[ParsedCall]:
        bodies = _CALL.findall(tail)
        if final and tail.count("<tool_call>") > len(bodies):     # the last call was cut off
            bodies.append(tail[tail.rfind("<tool_call>") + len("<tool_call>"):])
        out = []
        for body in bodies:
            try:
                call = json.loads(body)
                out.append(ParsedCall(call["name"], arguments_json(call.get("arguments", {}))))
            except (ValueError, KeyError, TypeError):
                break
        return out

    def partial(self, tail: str, done: int) -> Optional[tuple[str, str]]:
        parts = tail.split("<tool_call>")
        if len(parts) != done + 2 or "</tool_call>" in parts[-1]:
            return None
        return json_call_prefix(parts[-1], ("arguments",))
