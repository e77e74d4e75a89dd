"""/v1/responses, OpenAI's Responses API with vLLM's request and response shapes, whole or as its
stream of typed events (the output items: responses_items.py).

A request runs as a chat completion: ``instructions`` become the system message, ``input`` (a
string, or input items: messages whose content is a string or input_text parts, the model's earlier
``function_call`` items and the ``function_call_output`` items answering them) the conversation,
``max_output_tokens`` the limit, ``text.format`` the output constraint (json_schema / json_object),
function ``tools`` and ``tool_choice`` chat's tools and tool_choice (so tool calls are parsed by
--tool-call-parser, or forced by the grammar for required and a named function, as in chat); vLLM's
sampling fields pass through as they are. Responses are not stored (vLLM's default without
VLLM_ENABLE_RESPONSES_API_STORE), so ``previous_response_id`` is refused.
"""

from __future__ import annotations

import json
import time
from typing import Optional, Union

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from epplat.core.server.protocol import APIError, ChatCompletionRequest
from epplat.core.server.responses_items import ItemEvents, output_items

_RESPONSES_ONLY = {"input", "instructions", "max_output_tokens", "text", "store", "previous_response_id", "tools",
                   "tool_choice", "parallel_tool_calls", "reasoning", "include", "metadata", "background",
                   "truncation", "service_tier", "stream", "top_logprobs", "prompt", "user"}


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    input: Union[str, list[dict]]
    instructions: Optional[str] = None
    model: Optional[str] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    stream: Optional[bool] = False
    store: Optional[bool] = True
    previous_response_id: Optional[str] = None
    text: Optional[dict] = None
    tools: Optional[list] = None
    tool_choice: Optional[Union[str, dict]] = "auto"
    parallel_tool_calls: Optional[bool] = True
    metadata: Optional[dict] = None


def _call_items(msgs: list[dict], item: dict) -> None:
    """An input function_call (joining the assistant's calls just before it) or function_call_output."""
    if not all(isinstance(item.get(k), str) for k in (("call_id", "name", "arguments") if item["type"] ==
                                                      "function_call" else ("call_id", "output"))):
        raise APIError(400, f"{item['type']} input items need string call_id and "
                            f"{'name and arguments' if item['type'] == 'function_call' else 'output'}", "input")
    if item["type"] == "function_call_output":
        msgs.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        return
    call = {"id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]}}
    if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls") is not None:
        msgs[-1]["tool_calls"].append(call)
    else:
        msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _messages(req: ResponsesRequest) -> list[dict]:
    msgs = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        return msgs + [{"role": "user", "content": req.input}]
    for item in req.input:
        if item.get("type") in ("function_call", "function_call_output"):
            _call_items(msgs, item)
            continue
        if item.get("type", "message") != "message" or not isinstance(item.get("role"), str):
            raise APIError(400, f"input items of type {item.get('type')!r} are not supported (only messages, "
                                "function_call and function_call_output)", "input")
        content = item.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if len(parts) != len(content) or not all(isinstance(t, str) for t in parts) or any(
                    p.get("type") not in ("input_text", "output_text", "text") for p in content):
                raise APIError(400, "message content parts must be input_text (or output_text) parts", "input")
            content = "\n".join(parts)
        elif not isinstance(content, str):
            raise APIError(400, "message content must be a string or a list of input_text parts", "input")
        msgs.append({"role": item["role"], "content": content})
    if not msgs:
        raise APIError(400, "input must not be empty", "input")
    return msgs


def _response_format(text: Optional[dict]) -> Optional[dict]:
    """text.format of the Responses API as chat's response_format."""
    fmt = (text or {}).get("format")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")}}
    return {"type": fmt.get("type")}


def _tools(req: ResponsesRequest) -> dict:
    """Responses' function tools ({"type": "function", "name", "description", "parameters"}) and
    tool_choice as chat's."""
    if not req.tools:
        return {}
    tools = []
    for t in req.tools:
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise APIError(400, f"tools of type {kind!r} are not supported (only function tools)", "tools")
        tools.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                        if k in t}})
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise APIError(400, "tool_choice must be none, auto, required or {\"type\": \"function\", "
                                "\"name\": ...}", "tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return {"tools": tools, "tool_choice": choice, "parallel_tool_calls": req.parallel_tool_calls}


def to_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    if req.previous_response_id is not None:
        raise APIError(400, "previous_response_id needs stored responses, which this server does not keep",
                       "previous_response_id")
    body = {k: v for k, v in (req.model_extra or {}).items() if k not in _RESPONSES_ONLY}
    body.update(messages=_messages(req), model=req.model, max_tokens=req.max_output_tokens, **_tools(req))
    fmt = _response_format(req.text)
    if fmt is not None:
        body["response_format"] = fmt
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        raise APIError(400, f"{'.'.join(map(str, err['loc'])) or 'request'}: {err['msg']}",
                       str(err["loc"][0]) if err["loc"] else None) from None


def _usage(prompt: int, output: int, cached: int = 0) -> dict:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + output}


def _response(req: ResponsesRequest, rid: str, created: int, model: str, status: str, output: list, usage,
              incomplete: Optional[str] = None) -> dict:
    return {"id": rid, "object": "response", "created_at": created, "model": model, "status": status,
            "output": output, "usage": usage, "error": None,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata, "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": None,
            "tool_choice": req.tool_choice, "tools": req.tools or [], "text": req.text or {"format": {"type": "text"}},
            "temperature": (req.model_extra or {}).get("temperature"), "top_p": (req.model_extra or {}).get("top_p"),
            "store": False, "truncation": "disabled", "background": False, "reasoning": None, "service_tier": "auto"}


def _status(finish: Optional[str]) -> tuple[str, Optional[str]]:
    return ("incomplete", "max_output_tokens") if finish == "length" else ("completed", None)


async def responses(serving, req: ResponsesRequest, raw: Request) -> Response:
    arrival, created = time.monotonic(), int(time.time())
    chat = to_chat(req)
    jobs, ids, model, base, rid = await serving.chat_jobs(chat, raw, prefix="resp_")
    msg_id = f"msg_{base}"
    if req.stream:
        return StreamingResponse(_events(serving, req, chat, jobs, arrival, rid, created, model, msg_id),
                                 media_type="text/event-stream", headers={"X-Request-Id": base})
    c = (await serving._collect(jobs, arrival, raw))[0]
    status, why = _status(c.finish_reason)
    body = _response(req, rid, created, model, status, output_items(serving._chat_outputs(chat).whole(c.text), msg_id),
                     _usage(len(ids), c.num_tokens), why)
    return Response(_json(body), media_type="application/json", headers={"X-Request-Id": base})


def _json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


async def _events(serving, req, chat, jobs, arrival, rid, created, model, msg_id):
    """vLLM's event sequence: created, in_progress, then each output item's (output_item.added, its
    deltas, its done events, output_item.done; a message's text within content_part.added / done),
    completed."""
    seq = 0

    def event(kind: str, **fields) -> bytes:
        nonlocal seq
        data = _json({"type": kind, "sequence_number": seq, **fields})
        seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    yield event("response.created", response=_response(req, rid, created, model, "in_progress", [], None))
    yield event("response.in_progress", response=_response(req, rid, created, model, "in_progress", [], None))
    items, parse = ItemEvents(event, msg_id), serving._chat_outputs(chat).stream()
    num_tokens, finish = 0, None
    try:
        async for _, out in serving._merged(jobs, arrival):
            num_tokens += len(out.token_ids)
            finish = out.finish_reason or finish
            for e in items.feed(parse.feed(out.text, bool(out.finish_reason))):
                yield e
    except Exception as e:
        err = e if isinstance(e, APIError) else APIError(500, "Internal server error.")
        yield event("error", code=str(err.status), message=err.message, param=err.param)
        return
    for e in items.finish():
        yield e
    status, why = _status(finish)
    yield event("response.completed", response=_response(req, rid, created, model, status, items.items,
                                                         _usage(len(jobs[0].prompt_ids), num_tokens), why))
