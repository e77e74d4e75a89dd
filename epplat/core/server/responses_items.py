"""The output items of a /v1/responses answer, as vLLM's Responses API gives them: a ``reasoning`` item
(what --reasoning-parser split off), an assistant ``message`` with the text, and one ``function_call``
item per tool call; whole (``output_items``) or as the typed events of a stream (``ItemEvents``: an
item opens when its first piece arrives and closes when the next item begins or the answer ends; a
reasoning item's text and a message's lie in a content part, a reasoning_text or an output_text one).
"""

from __future__ import annotations

import uuid
from typing import Callable, Optional

from epplat.core.server.chat_output import ChatOutput
from epplat.core.server.protocol import DeltaMessage


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(msg_id: str, text: str, status: str) -> dict:
    return {"id": msg_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}]}


def reasoning_item(item_id: str, text: str, status: str) -> dict:
    return {"id": item_id, "type": "reasoning", "summary": [], "status": status, "encrypted_content": None,
            "content": [{"type": "reasoning_text", "text": text}]}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


# an item's content part (vLLM's content_part.added / done events carry it): text -> part
_PARTS = {"message": lambda text: message_item("", text, "")["content"][0],
          "reasoning": lambda text: reasoning_item("", text, "")["content"][0]}


def output_items(out: ChatOutput, msg_id: str) -> list[dict]:
    """A finished answer's items; the message is there when it has text or nothing else is."""
    items = [reasoning_item(_id("rs"), out.reasoning_content, "completed")] if out.reasoning_content else []
    if out.content or not out.tool_calls:
        items.append(message_item(msg_id, out.content or "", "completed"))
    items += [function_call_item(_id("fc"), call.id, call.function.name, call.function.arguments, "completed")
              for call in out.tool_calls]
    return items


class ItemEvents:
    """A streamed answer's items: ``feed`` a chat delta, get the events it makes (``event(kind, **fields)``
    builds one); ``finish`` closes the last item. ``items`` holds every closed item, in order."""

    def __init__(self, event: Callable[..., bytes], msg_id: str):
        self.event, self.msg_id = event, msg_id
        self.items: list[dict] = []
        self.kind: Optional[str] = None       # the open item's: reasoning, message, or function_call
        self.item: dict = {}
        self.text = ""

    def _where(self, content: bool = True) -> dict:
        where = {"item_id": self.item["id"], "output_index": len(self.items)}
        return {**where, "content_index": 0} if content else where

    def _open(self, kind: str, item: dict) -> list[bytes]:
        out = self._close()
        self.kind, self.item, self.text = kind, item, ""
        out.append(self.event("response.output_item.added", output_index=len(self.items), item=item))
        if kind in _PARTS:
            out.append(self.event("response.content_part.added", **self._where(), part=_PARTS[kind]("")))
        return out

    def _close(self) -> list[bytes]:
        kind, text = self.kind, self.text
        if kind is None:
            return []
        if kind == "reasoning":
            done = reasoning_item(self.item["id"], text, "completed")
            out = [self.event("response.reasoning_text.done", **self._where(), text=text),
                   self.event("response.content_part.done", **self._where(), part=done["content"][0])]
        elif kind == "message":
            done = message_item(self.item["id"], text, "completed")
            out = [self.event("response.output_text.done", **self._where(), text=text, logprobs=[]),
                   self.event("response.content_part.done", **self._where(), part=done["content"][0])]
        else:
            done = {**self.item, "arguments": text, "status": "completed"}
            out = [self.event("response.function_call_arguments.done", **self._where(False), name=done["name"],
                              arguments=text)]
        out.append(self.event("response.output_item.done", output_index=len(self.items), item=done))
        self.items.append(done)
        self.kind = None
        return out

    def feed(self, delta: Optional[DeltaMessage]) -> list[bytes]:
        out: list[bytes] = []
        if delta is None:
            return out
        if delta.reasoning_content:
            if self.kind != "reasoning":
                out += self._open("reasoning", {**reasoning_item(_id("rs"), "", "in_progress"), "content": []})
            self.text += delta.reasoning_content
            out.append(self.event("response.reasoning_text.delta", **self._where(), delta=delta.reasoning_content))
        if delta.content:
            if self.kind != "message":
                out += self._open("message", {**message_item(self.msg_id, "", "in_progress"), "content": []})
            self.text += delta.content
            out.append(self.event("response.output_text.delta", **self._where(), delta=delta.content, logprobs=[]))
        for call in delta.tool_calls or []:
            f = call.function
            if call.id is not None:          # a call's first piece
                out += self._open("function_call", function_call_item(_id("fc"), call.id, f.name, "", "in_progress"))
            if f.arguments:
                self.text += f.arguments
                out.append(self.event("response.function_call_arguments.delta", **self._where(False),
                                      delta=f.arguments))
        return out

    def finish(self) -> list[bytes]:
        """Close the last item (an answer without any gets its empty message)."""
        out = [] if self.items or self.kind else self._open("message", {**message_item(self.msg_id, "", "in_progress"),
                                                                        "content": []})
        return out + self._close()
