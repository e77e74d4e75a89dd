"""vLLM's ``deepseek_v3`` format (DeepSeek-V3, R1): between ``<｜tool▁calls▁begin｜>`` and
``<｜tool▁calls▁end｜>``, each call is ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`` then the
arguments in a json code block, then ``<｜tool▁call▁end｜>``."""

from __future__ import annotations

import json
import re

from typing import Optional

from epplat.core.server.tool_parsers.base import ParsedCall, ToolParser, held_back

_CALL = re.compile(r"<｜tool▁call▁begin｜>(?P<type>.*?)<｜tool▁sep｜>(?P<name>.*?)\n```json\n(?P<args>.*?)\n```"
                   r"\s*<｜tool▁call▁end｜>", re.DOTALL)


_BEGIN, _ARGS, _END = "<｜tool▁call▁begin｜>", "\n```json\n", "\n```"


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

    def partial(self, tail: str, done: int) -> Optional[tuple[str, str]]:
        parts = tail.split(_BEGIN)
        if len(parts) != done + 2 or _ARGS not in parts[-1] or "<｜tool▁sep｜>" not in parts[-1]:
            return None
        head, args = parts[-1].split(_ARGS, 1)
        end = args.find(_END)           # the arguments are sent as written, up to their code block's end
        return head.split("<｜tool▁sep｜>", 1)[1].strip(), args[:end] if end >= 0 else args[:len(args) - held_back(args, _END)]
