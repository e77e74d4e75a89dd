"""Large request bodies are parsed first in a tokenizer worker process, not on the event loop.

Decoding and validating a body holds the GIL for the whole call (a 12 MiB list of token ids
took 1.4 s: JSON, then pydantic), so no thread would let /health answer meanwhile. A body
over IN_PLACE_BODY_BYTES is decoded and validated in a worker, with the caps that need no
tokenizer (prompts x n, token-id prompts against the context); one that fails comes back as
its 400 and the event loop never parses it. One that passes comes back as the validated
request itself, which the route takes as its body (FastAPI does not validate a model instance
again): it is unpickled in the pool's result thread, not on the loop, and its token-id lists
travel as raw int64 bytes, one Python call each to unpack, so the loop gets the GIL between
them (a 12 MiB body of token ids: pydantic 0.15 s on the loop before, 0.02 s of unpacking now).
"""

from __future__ import annotations

from array import array
from typing import Optional, Union

import msgspec
from pydantic import ValidationError

from epplat.core.server.protocol import APIError

IN_PLACE_BODY_BYTES = 1 << 20


def invalid_json(err: Exception) -> APIError:
    return APIError(400, f"The request body is not valid JSON: {err}")


def validation_error(err: dict) -> APIError:
    """Pydantic's first error (its `loc` without FastAPI's leading "body") as the 400 the client gets."""
    ctx = err.get("ctx") or {}
    field = ".".join(str(x) for x in err.get("loc", ()))
    msg = err.get("msg", "Invalid request.")
    return APIError(400, f"{field}: {msg}" if field else msg, ctx.get("param") or field or None)


def choices_error(num_prompts: int, n: int, max_choices: int) -> Optional[APIError]:
    if num_prompts * n <= max_choices:
        return None
    return APIError(400, f"{num_prompts} prompt(s) x n={n} asks for {num_prompts * n} choices; this server allows "
                         f"at most {max_choices} per request (--max-choices-per-request).", "n")


def context_error(max_model_len: int, prompt_len: int) -> APIError:
    return APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
                         f"{prompt_len} tokens. Please reduce the length of the prompt.", "prompt")


def prompt_list(prompt) -> list:
    """A completion request's prompts: one text or token-id list, or a list of them."""
    return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt


class PackedIds(list):
    """A token-id list that pickles as raw int64 bytes (unpickled by one call of unpack_ids)."""

    def __reduce__(self):
        return unpack_ids, (array("q", self).tobytes(),)


class IdBytes(bytes):
    """Token ids left packed as raw int64 bytes (/detokenize's, which the loop hands on to a worker)."""


def unpack_ids(raw: bytes) -> list[int]:
    ids = array("q")
    ids.frombytes(raw)
    return ids.tolist()


def check(kind: str, body: bytes, max_model_len: int, max_choices: int) -> Union[tuple, object]:
    """In a worker: the validated request, or its error as a tuple (status, message, param)."""
    from epplat.core.server import protocol, responses, tokenize
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        return _tuple(invalid_json(e))
    try:
        if kind in ("tokenize", "detokenize"):
            req = tokenize.parse(tokenize.TokenizeRequest if kind == "tokenize" else tokenize.DetokenizeRequest, obj)
            if kind == "detokenize" and isinstance(_packed(req.tokens), PackedIds):
                req.__dict__["tokens"] = IdBytes(array("q", req.tokens).tobytes())
            return req
        cls = {"completions": protocol.CompletionRequest, "chat": protocol.ChatCompletionRequest,
               "responses": responses.ResponsesRequest}[kind]
        req = cls.model_validate(obj)
    except ValidationError as e:
        return _tuple(validation_error(e.errors()[0]))
    except APIError as e:
        return _tuple(e)
    err = None
    if kind == "chat":
        err = choices_error(1, req.n, max_choices)
    elif kind == "completions":
        prompts = prompt_list(req.prompt)
        err = choices_error(len(prompts), req.n, max_choices)
        long = [len(p) for p in prompts if not isinstance(p, str) and len(p) >= max_model_len]
        err = err or (context_error(max_model_len, long[0]) if long and max_model_len else None)
        if not err:
            _pack_prompts(req)
    return _tuple(err) if err else req


def _packed(ids):
    """PackedIds of `ids` where each fits an int64 (an id out of range is refused later, as on the loop)."""
    if isinstance(ids, list) and ids and isinstance(ids[0], int) and -(1 << 63) <= min(ids) and max(ids) < (1 << 63):
        return PackedIds(ids)
    return ids


def _pack_prompts(req) -> None:
    # set in __dict__ (no validate_assignment): the values are the validated ones
    if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], int):
        req.__dict__["prompt"] = _packed(req.prompt)
    elif isinstance(req.prompt, list):
        req.__dict__["prompt"] = [_packed(p) for p in req.prompt]


def _tuple(err: APIError) -> tuple[int, str, Optional[str]]:
    return err.status, err.message, err.param
