"""Prompt tokenization and chat-template rendering off the API server's event loop.

Short prompts are tokenized in place (a round trip would cost more than the work). Long
ones go to worker processes that hold their own copy of the tokenizer (the Rust tokenizer
that transformers' fast tokenizer wraps, rebuilt from its JSON: no transformers import,
so a worker is up in a fraction of a second; a slow tokenizer is loaded whole): threads would not
do, as the tokenizer's Rust and C steps hold the GIL for long stretches (a 5 MB prompt
held it for 0.75 s at a time) and /health would wait on them. A worker sends the ids back
only when they fit the context; otherwise just their count, for the 400. Chat templates
render in a thread (transformers renders them in Jinja's ImmutableSandboxedEnvironment),
so the loop keeps answering while a long conversation renders. A large request body is
decoded and checked in a worker first (body_check.py). /tokenize and /detokenize of long
inputs are answered by a worker whole: it tokenizes (or decodes) and writes the JSON body.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import signal
from array import array
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Optional, Union

import msgspec

from epplat.core.server import body_check
from epplat.core.server.protocol import APIError

IN_PLACE_CHARS = 4096
IN_PLACE_IDS = 4096

_worker_tok = None


class _RustTokenizer:
    """transformers' fast tokenizer's calls, on the Rust tokenizer it wraps."""

    def __init__(self, rust_json: str, clean_up_spaces: bool):
        from tokenizers import Tokenizer
        self.rust, self.clean_up_spaces = Tokenizer.from_str(rust_json), clean_up_spaces

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.rust.encode(text, add_special_tokens=add_special_tokens).ids

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.rust.id_to_token(i) for i in ids]

    def decode(self, ids: list[int]) -> str:
        text = self.rust.decode(ids, skip_special_tokens=False)
        if self.clean_up_spaces:    # what transformers' clean_up_tokenization does
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text


def _worker_init(rust_json: Optional[str], clean_up_spaces: bool, model_dir: str, parent_pid: int) -> None:
    from epplat.core.distributed.lifeline import die_with_parent
    die_with_parent(parent_pid)
    for sig in (signal.SIGINT, signal.SIGTERM):   # the API server decides when the pool stops
        signal.signal(sig, signal.SIG_IGN)
    global _worker_tok
    if rust_json is not None:
        _worker_tok = _RustTokenizer(rust_json, clean_up_spaces)
    else:
        from transformers import AutoTokenizer
        _worker_tok = AutoTokenizer.from_pretrained(model_dir)


def _worker_encode(text: str, add_special_tokens: bool, limit: int) -> tuple[int, Optional[bytes]]:
    ids = _worker_tok.encode(text, add_special_tokens=add_special_tokens)
    return len(ids), array("q", ids).tobytes() if len(ids) <= limit else None


def tokenize_body(tok, text: str, add_special_tokens: bool, token_strs: bool, max_model_len: int) -> bytes:
    """/tokenize's JSON body (vLLM's: any length is tokenized; `count` may exceed max_model_len)."""
    ids = tok.encode(text, add_special_tokens=add_special_tokens)
    return msgspec.json.encode({"count": len(ids), "max_model_len": max_model_len, "tokens": ids,
                                "token_strs": tok.convert_ids_to_tokens(ids) if token_strs else None})


def detokenize_body(tok, ids: list[int], vocab_size: int) -> bytes:
    """/detokenize's JSON body; APIError for an id out of the vocabulary."""
    if ids and not (0 <= min(ids) and max(ids) < vocab_size):
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise APIError(400, f"Token id {bad} is out of vocabulary (size {vocab_size}).", "tokens")
    return msgspec.json.encode({"prompt": tok.decode(ids)})


def _worker_tokenize(*args) -> bytes:
    return tokenize_body(_worker_tok, *args)


def _worker_detokenize(ids: Union[list[int], bytes], vocab_size: int) -> Union[bytes, tuple]:
    try:
        return detokenize_body(_worker_tok, body_check.unpack_ids(ids) if isinstance(ids, bytes) else ids,
                               vocab_size)
    except APIError as e:
        return e.status, e.message, e.param


class TokenizerPool:
    """`size` tokenizer processes and `size` template threads beside the event loop."""

    def __init__(self, tokenizer, size: int):
        self.tok, self.size = tokenizer, size
        rust = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else None
        clean = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self._procs = ProcessPoolExecutor(size, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                          initargs=(rust, clean, tokenizer.name_or_path, os.getpid()))
        self._threads = ThreadPoolExecutor(size, thread_name_prefix="epplat-template")

    async def warm_up(self) -> None:
        """Start the worker processes and wait until they are ready (before the server says healthy)."""
        await asyncio.gather(*(asyncio.wrap_future(self._procs.submit(_worker_encode, "", False, 0))
                               for _ in range(self.size)))

    async def encode(self, text: str, add_special_tokens: bool, limit: int) -> tuple[int, Optional[list[int]]]:
        """(number of tokens, the ids or None when there are more than `limit`)."""
        if len(text) <= IN_PLACE_CHARS:
            ids = self.tok.encode(text, add_special_tokens=add_special_tokens)
            return len(ids), ids
        n, raw = await asyncio.wrap_future(self._procs.submit(_worker_encode, text, add_special_tokens, limit))
        if raw is None:
            return n, None
        ids = array("q")
        ids.frombytes(raw)
        return n, ids.tolist()

    async def check_body(self, kind: str, body: bytes, max_model_len: int, max_choices: int):
        """A body too large to parse on the loop is parsed and validated in a worker: the request model
        (None for a small body, which the loop parses), or its 400 raised."""
        if len(body) <= body_check.IN_PLACE_BODY_BYTES:
            return None
        got = await asyncio.wrap_future(self._procs.submit(body_check.check, kind, body, max_model_len, max_choices))
        if isinstance(got, tuple):
            raise APIError(*got)
        return got

    async def tokenize_body(self, text: str, add_special_tokens: bool, token_strs: bool, max_model_len: int) -> bytes:
        if len(text) <= IN_PLACE_CHARS:
            return tokenize_body(self.tok, text, add_special_tokens, token_strs, max_model_len)
        return await asyncio.wrap_future(self._procs.submit(_worker_tokenize, text, add_special_tokens, token_strs,
                                                            max_model_len))

    async def detokenize_body(self, ids: Union[list[int], bytes], vocab_size: int) -> bytes:
        """`ids` as a list, or as body_check.IdBytes from a worker's parse (handed on unpacked)."""
        packed = isinstance(ids, bytes)
        if (len(ids) // 8 if packed else len(ids)) <= IN_PLACE_IDS:
            return detokenize_body(self.tok, body_check.unpack_ids(ids) if packed else ids, vocab_size)
        arg = bytes(ids) if packed else body_check.PackedIds(ids)
        got = await asyncio.wrap_future(self._procs.submit(_worker_detokenize, arg, vocab_size))
        if isinstance(got, tuple):
            raise APIError(*got)
        return got

    async def render(self, fn, /, *args, **kwargs):
        """fn(*args, **kwargs) in a template thread."""
        return await asyncio.get_running_loop().run_in_executor(self._threads,
                                                                functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._procs.shutdown(wait=False, cancel_futures=True)
        self._threads.shutdown(wait=False, cancel_futures=True)
