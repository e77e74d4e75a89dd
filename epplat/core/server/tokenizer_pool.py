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
decoded and checked in a worker first (body_check.py).
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import signal
from array import array
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Optional

from epplat.core.server import body_check
from epplat.core.server.protocol import APIError

IN_PLACE_CHARS = 4096

_worker_tokenizer = None


def _worker_init(rust_json: Optional[str], model_dir: str, parent_pid: int) -> None:
    from epplat.core.distributed.lifeline import die_with_parent
    die_with_parent(parent_pid)
    for sig in (signal.SIGINT, signal.SIGTERM):   # the API server decides when the pool stops
        signal.signal(sig, signal.SIG_IGN)
    global _worker_tokenizer
    if rust_json is not None:
        from tokenizers import Tokenizer
        rust = Tokenizer.from_str(rust_json)
        _worker_tokenizer = lambda text, special: rust.encode(text, add_special_tokens=special).ids  # noqa: E731
    else:
        from transformers import AutoTokenizer
        slow = AutoTokenizer.from_pretrained(model_dir)
        _worker_tokenizer = lambda text, special: slow.encode(text, add_special_tokens=special)  # noqa: E731


def _worker_encode(text: str, add_special_tokens: bool, limit: int) -> tuple[int, Optional[bytes]]:
    ids = _worker_tokenizer(text, add_special_tokens)
    return len(ids), array("q", ids).tobytes() if len(ids) <= limit else None


class TokenizerPool:
    """`size` tokenizer processes and `size` template threads beside the event loop."""

    def __init__(self, tokenizer, size: int):
        self.tok, self.size = tokenizer, size
        rust = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else None
        self._procs = ProcessPoolExecutor(size, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_worker_init, initargs=(rust, tokenizer.name_or_path, os.getpid()))
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

    async def check_body(self, kind: str, body: bytes, max_model_len: int, max_choices: int) -> None:
        """A body too large to parse on the loop is parsed in a worker first; raises its 400 if it fails there."""
        if len(body) <= body_check.IN_PLACE_BODY_BYTES:
            return
        err = await asyncio.wrap_future(self._procs.submit(body_check.check, kind, body, max_model_len, max_choices))
        if err is not None:
            raise APIError(*err)

    async def render(self, fn, /, *args, **kwargs):
        """fn(*args, **kwargs) in a template thread."""
        return await asyncio.get_running_loop().run_in_executor(self._threads,
                                                                functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._procs.shutdown(wait=False, cancel_futures=True)
        self._threads.shutdown(wait=False, cancel_futures=True)
