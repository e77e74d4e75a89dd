"""vLLM's ``deepseek_v3`` format (DeepSeek-V3, R1): between ``<｜tool▁calls▁begin｜>`` and
``<｜tool▁calls▁end｜>``, each call is ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`` then the
arguments in a json code block, then ``<｜tool▁call▁end｜>``."""

from __future__ import annotations

import json
import re

from epplat.core.server.tool_parsers.base import ParsedCall, ToolParser

_CALL = re.compile(r"<｜tool▁call▁begin｜>(?P<type>.*?)<｜tool▁sep｜>(?P<name>.*?)\n```json\n(?P<args>.*?)\n```"
                   r"\s*<｜tool▁call▁end｜>", re.DOTALL)


class DeepSeekV3ToolParser(ToolParser):
    start = "<｜tool▁calls▁begin｜>"

    def calls(self, tail: str, final: bool) -> list[ParsedCall]:
        out = []
        for m in _CALL.finditer(tail):
            try:
                json.loads(m["args"])
            except ValueError:
                break
            out.append(ParsedCall(m["name"].strip(), m["args"]))
        return out
