"""The part of a tool call's arguments that is certain while the model is still writing them, so that a
streamed call sends its arguments in pieces which add up to the finished call's.

A finished call's arguments are ``json.dumps`` of what the model wrote (``arguments_json``: spacing and
escapes normalized, a string kept as it is); ``dumped_prefix`` gives, for the text written so far, the
longest prefix of that which no continuation can change: complete punctuation, complete or partial
strings (up to their last whole escape), numbers and literals once something follows them.
"""

from __future__ import annotations

import json
import re
from typing import Optional

_SPACE = " \t\n\r"
_PUNCT = {"{": "{", "[": "[", "}": "}", "]": "]", ",": ", ", ":": ": "}
_SCALAR = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null")
_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*(,\s*"(\w+)"\s*:)?')


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _SPACE:
        i += 1
    return i


def _string(text: str, i: int) -> tuple[Optional[int], str]:
    """The JSON string opening at text[i]: (the index after its closing quote, or None while it is
    open; its characters so far, up to its last whole escape)."""
    j = safe = i + 1
    n = len(text)
    while j < n:
        c = text[j]
        if c == '"':
            return j + 1, json.loads(text[i:j + 1])
        if c == "\\":
            if j + 1 >= n:
                break
            if text[j + 1] == "u":
                code = text[j + 2:j + 6]
                if len(code) < 4:
                    break
                j += 12 if 0xD800 <= int(code, 16) < 0xDC00 else 6      # a surrogate pair is one character
                if j > n:
                    break
            else:
                j += 2
        else:
            j += 1
        safe = j
    return None, json.loads(text[i:safe] + '"')


def dumped_prefix(text: str) -> str:
    """A prefix of ``arguments_json(json.loads(value))`` for the JSON value that ``text`` begins (it may
    be unfinished and may go on past the value), certain whatever the model writes next; "" when the
    text is not JSON."""
    try:
        i = _skip(text, 0)
        if text[i:i + 1] == '"':                      # arguments written as a string: kept as they are
            return _string(text, i)[1]
        return _dumped(text, i)
    except (ValueError, IndexError):
        return ""


def _dumped(text: str, i: int) -> str:
    out: list[str] = []
    depth = 0
    while i < len(text):
        c = text[i]
        if c in _PUNCT:
            out.append(_PUNCT[c])
            depth += (c in "{[") - (c in "}]")
            i += 1
        elif c == '"':
            end, s = _string(text, i)
            dumped = json.dumps(s, ensure_ascii=False)
            if end is None:
                out.append(dumped[:-1])
                break
            out.append(dumped)
            i = end
        else:
            m = _SCALAR.match(text, i)
            if m is None or (c not in "tfn" and text[m.end():m.end() + 1] not in tuple(_SPACE + ",]}")):
                break        # a number is complete only once something that is not part of it follows
            out.append(json.dumps(json.loads(m.group())))
            i = m.end()
        if depth <= 0:
            break
        i = _skip(text, i)
    return "".join(out)


def json_call_prefix(text: str, argument_keys: tuple[str, ...]) -> Optional[tuple[str, str]]:
    """A call written as {"name": ..., KEY: ARGUMENTS} being written at the start of ``text``: its name
    and the certain prefix of its arguments; None until its name is complete (or when it is written
    another way: it is then sent whole once complete)."""
    m = _NAME.match(text)
    if m is None:
        return None
    try:
        name = json.loads(m.group(1))
    except ValueError:
        return None
    if m.group(2) is None:
        return name, ""
    if m.group(3) not in argument_keys:
        return None
    return name, dumped_prefix(text[m.end():])
