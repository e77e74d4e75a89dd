"""Prompt tokenization and chat-template rendering off the API server's event loop.

Short prompts are tokenized in place (a round trip would cost more than the work). Long
ones go to worker processes that load their own copy of the tokenizer: threads would not
do, as the tokenizer's Rust and C steps hold the GIL for long stretches (a 5 MB prompt
held it for 0.75 s at a time) and /health would wait on them. A worker sends the ids back
only when they fit the context; otherwise just their count, for the 400. Chat templates
render in a thread (transformers renders them in Jinja's ImmutableSandboxedEnvironment),
so the loop keeps answering while a long conversation renders.
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

IN_PLACE_CHARS = 4096

_worker_tokenizer = None


def _worker_init(model_dir: str, parent_pid: int) -> None:
    from epplat.core.distributed.lifeline import die_with_parent
    die_with_parent(parent_pid)
    for sig in (signal.SIGINT, signal.SIGTERM):   # the API server decides when the pool stops
        signal.signal(sig, signal.SIG_IGN)
    global _worker_tokenizer
    from transformers import AutoTokenizer
    _worker_tokenizer = AutoTokenizer.from_pretrained(model_dir)


def _worker_encode(text: str, add_special_tokens: bool, limit: int) -> tuple[int, Optional[bytes]]:
    ids = _worker_tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return len(ids), array("q", ids).tobytes() if len(ids) <= limit else None


class TokenizerPool:
    """`size` tokenizer processes and `size` template threads beside the event loop."""

    def __init__(self, tokenizer, size: int):
        self.tok, self.size = tokenizer, size
        self._procs = ProcessPoolExecutor(size, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_worker_init, initargs=(tokenizer.name_or_path, os.getpid()))
        self._threads = ThreadPoolExecutor(size, thread_name_prefix="epplat-template")

    def warm_up(self) -> None:
        """Start the worker processes now rather than on the first long prompt."""
        for _ in range(self.size):
            self._procs.submit(_worker_encode, "", False, 0)

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

    async def render(self, fn, /, *args, **kwargs):
        """fn(*args, **kwargs) in a template thread."""
        return await asyncio.get_running_loop().run_in_executor(self._threads,
                                                                functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._procs.shutdown(wait=False, cancel_futures=True)
        self._threads.shutdown(wait=False, cancel_futures=True)
