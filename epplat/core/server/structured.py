"""A request's output constraint, in vLLM's shapes, as the engine's StructuredOutput.

``response_format`` ({"type": "json_object"} / {"type": "json_schema", "json_schema": {"schema": ...}})
or ``structured_outputs`` (exactly one of json, regex, choice, grammar, json_object, and the option
disable_any_whitespace), merged as vLLM merges them; the constraint is parsed here (xgrammar, without the vocabulary) so that a malformed one is a 400 naming its field.
"""

from __future__ import annotations

import json
from typing import Optional

from epplat.core.engine.protocol import StructuredOutput
from epplat.core.engine.structured_output import check, choice_grammar
from epplat.core.server.protocol import APIError

_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _from_response_format(rf: dict, so: dict) -> None:
    """vLLM's way: response_format fills in structured_outputs (whose options still apply)."""
    kind = rf.get("type")
    if kind == "json_object":
        so["json_object"] = True
    elif kind == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema")
        if not isinstance(schema, (dict, bool)):
            raise APIError(400, "response_format json_schema needs json_schema.schema (a JSON schema)",
                           "response_format")
        so["json"] = schema
    elif kind != "text":
        raise APIError(400, f"response_format type must be text, json_object or json_schema (got {kind!r})",
                       "response_format")


def _from_structured_outputs(so: dict) -> Optional[StructuredOutput]:
    def bad(message: str):
        return APIError(400, message, "structured_outputs")
    kinds = [k for k in _KINDS if so.get(k) not in (None, False)]
    if not kinds:
        return None
    if len(kinds) > 1:
        raise bad(f"You can only use one kind of structured outputs constraint but multiple are specified: {kinds}")
    kind, value = kinds[0], so[kinds[0]]
    spaces = not so.get("disable_any_whitespace", False)
    if kind == "structural_tag":
        raise bad("structured_outputs.structural_tag is not supported")
    if kind == "json_object":
        return StructuredOutput("json_object", any_whitespace=spaces)
    if kind == "json":
        return StructuredOutput("json", value if isinstance(value, str) else json.dumps(value), spaces)
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise bad("structured_outputs.choice must be a list of non-empty strings")
        return StructuredOutput("grammar", choice_grammar(value))
    if not isinstance(value, str):
        raise bad(f"structured_outputs.{kind} must be a string")
    return StructuredOutput(kind, value)


def structured_output(req) -> Optional[StructuredOutput]:
    """The request's constraint (None: free text), checked to parse."""
    so = dict(req.structured_outputs or {})
    if req.response_format is not None:
        _from_response_format(req.response_format, so)
    return checked(so, "response_format" if req.response_format else "structured_outputs")


def checked(so: dict, param: str = "structured_outputs") -> Optional[StructuredOutput]:
    """vLLM's structured_outputs fields as the engine's constraint, checked to parse (a 400 naming param)."""
    spec = _from_structured_outputs(so)
    if spec is not None:
        try:
            check(spec)
        except (ValueError, RuntimeError) as e:
            raise APIError(400, str(e), param) from None
    return spec
