"""Reasoning parsers (vLLM's ``--reasoning-parser NAME``): a thinking model's answer split into
``reasoning_content`` (between ``<think>`` and ``</think>``) and ``content``, whole or streamed;
registered as plugins (the ``epplat_reasoning_parsers`` hook).

qwen3: an answer is reasoning only when it opens with ``<think>`` and closes it (Qwen3 with
thinking off writes no think block); deepseek_r1: the chat template opens the think block in the
prompt, so everything before ``</think>`` is reasoning, and an answer that never closes it is all
reasoning (vLLM's rules for both).
"""

from __future__ import annotations

from typing import Optional

from epplat.core.server.tool_parsers.base import held_back
from epplat.hookspecs import Registration, hookimpl

START, END = "<think>", "</think>"


class ThinkParser:
    """<think>...</think>; `opened_in_prompt`: the block is open before the answer's first token."""

    skip_special_tokens = False     # <think> may be a special token: it must stay in the text

    def __init__(self, opened_in_prompt: bool):
        self.opened_in_prompt = opened_in_prompt

    def split(self, text: str) -> tuple[Optional[str], Optional[str]]:
        """A whole answer as (reasoning_content, content)."""
        body = text.lstrip()
        opened = body.startswith(START)
        body = body[len(START):] if opened else text
        if END not in body:
            return (body, None) if self.opened_in_prompt else (None, body)
        if not (opened or self.opened_in_prompt):
            return None, text
        reasoning, _, content = body.partition(END)
        return reasoning, content or None

    def stream(self) -> "ReasoningStream":
        return ReasoningStream(self)


class ReasoningStream:
    """One streamed choice: feed text deltas, get (reasoning delta, content delta)."""

    def __init__(self, parser: ThinkParser):
        self.parser, self.text, self.sent = parser, "", 0
        self.state = "reasoning" if parser.opened_in_prompt else "undecided"

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        reasoning = ""
        if self.state in ("undecided", "reasoning") and self.sent == 0:
            body = self.text.lstrip()
            if START.startswith(body) and body != START and not final:
                return "", ""                              # may still be the opening tag
            if body.startswith(START):
                self.sent, self.state = len(self.text) - len(body) + len(START), "reasoning"
            elif self.state == "undecided":
                self.state = "content"
        if self.state == "reasoning":
            end = self.text.find(END, self.sent)
            if end < 0:
                stop = len(self.text) - (0 if final else held_back(self.text[self.sent:], END))
                reasoning, self.sent = self.text[self.sent:stop], max(stop, self.sent)
                return reasoning, ""
            reasoning, self.sent, self.state = self.text[self.sent:end], end + len(END), "content"
        content, self.sent = self.text[self.sent:], len(self.text)
        return reasoning, content


@hookimpl
def epplat_reasoning_parsers():
    return [Registration("qwen3", lambda: lambda: ThinkParser(False), help="<think>...</think> (Qwen3)"),
            Registration("deepseek_r1", lambda: lambda: ThinkParser(True),
                         help="...</think>, opened by the chat template (DeepSeek-R1)")]
