"""Large request bodies are parsed first in a tokenizer worker process, not on the event loop.

Decoding and validating a body holds the GIL for the whole call (a 12 MiB list of token ids
took 1.4 s: JSON, then pydantic), so no thread would let /health answer meanwhile. A body
over IN_PLACE_BODY_BYTES is decoded and validated in a worker, with the caps that need no
tokenizer (prompts x n, token-id prompts against the context); one that fails comes back as
its 400 and the event loop never parses it. One that passes is parsed again on the loop: its
size is then bounded by what the server serves (prompts x n x the context).
"""

from __future__ import annotations

from typing import Optional

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


def check(kind: str, body: bytes, max_model_len: int, max_choices: int) -> Optional[tuple[int, str, Optional[str]]]:
    """In a worker: None when the body is worth parsing on the loop, else its error (status, message, param)."""
    from epplat.core.server import protocol, tokenize
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        return _tuple(invalid_json(e))
    try:
        if kind in ("tokenize", "detokenize"):
            tokenize.parse(tokenize.TokenizeRequest if kind == "tokenize" else tokenize.DetokenizeRequest, obj)
            return None
        req = (protocol.CompletionRequest if kind == "completions" else protocol.ChatCompletionRequest).model_validate(obj)
    except ValidationError as e:
        return _tuple(validation_error(e.errors()[0]))
    except APIError as e:
        return _tuple(e)
    if kind == "chat":
        err = choices_error(1, req.n, max_choices)
    else:
        prompts = prompt_list(req.prompt)
        err = choices_error(len(prompts), req.n, max_choices)
        long = [len(p) for p in prompts if not isinstance(p, str) and len(p) >= max_model_len]
        err = err or (context_error(max_model_len, long[0]) if long and max_model_len else None)
    return _tuple(err) if err else None


def _tuple(err: APIError) -> tuple[int, str, Optional[str]]:
    return err.status, err.message, err.param
