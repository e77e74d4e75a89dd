"""A chat request's tool_choice as vLLM serves it: which choices this server can serve, and the
output constraint of "required" and of a named function (through the structured-output grammar, so
that what the model writes parses as the calls asked for, whatever the model)."""

from __future__ import annotations

import json
from typing import Optional

from epplat.core.engine.protocol import StructuredOutput
from epplat.core.server.protocol import APIError, ChatCompletionRequest

_ANY_OBJECT = {"type": "object"}


def check_tool_choice(req: ChatCompletionRequest, auto_tools: bool) -> None:
    """auto needs --enable-auto-tool-choice and a --tool-call-parser (vLLM's 400 otherwise)."""
    if req.tool_mode == "auto" and not auto_tools:
        raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                       "tool_choice")


def tool_schema(req: ChatCompletionRequest) -> Optional[dict]:
    """vLLM's schema: named, the function's parameters; required, a non-empty array of
    {"name": one of the tools, "parameters": its parameters}."""
    params = {t.function.name: t.function.parameters or _ANY_OBJECT for t in req.tools or []}
    if req.tool_mode == "named":
        return params[req.tool_choice.function.name]
    if req.tool_mode == "required":
        return {"type": "array", "minItems": 1,
                "items": {"type": "object", "anyOf": [
                    {"properties": {"name": {"type": "string", "enum": [name]}, "parameters": p},
                     "required": ["name", "parameters"]} for name, p in params.items()]}}
    return None


def tool_constraint(req: ChatCompletionRequest, own: Optional[StructuredOutput]) -> Optional[StructuredOutput]:
    """The constraint of a required or named tool_choice (None for auto / none); a request may not
    add its own on top (structured_outputs.disable_any_whitespace, an option, still applies)."""
    schema = tool_schema(req) if isinstance(req, ChatCompletionRequest) else None
    if schema is None:
        return None
    if own is not None:
        raise APIError(400, f"tool_choice {req.tool_mode} cannot be combined with response_format or "
                            "structured_outputs", "tool_choice")
    spaces = not (req.structured_outputs or {}).get("disable_any_whitespace", False)
    return StructuredOutput("json", json.dumps(schema), spaces)
