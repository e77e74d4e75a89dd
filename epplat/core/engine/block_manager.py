"""The KV block manager: a free list of fixed-size KV cache blocks and per-request tables."""

from __future__ import annotations

from collections import deque

from epplat.core.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_table))

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free)

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Grow req's block table to hold num_new_tokens more tokens; False if out of blocks."""
        n = self.blocks_needed(req, num_new_tokens)
        if n > len(self.free):
            return False
        req.block_table.extend(self.free.popleft() for _ in range(n))
        return True

    def release(self, req: Request) -> None:
        self.free.extend(req.block_table)
        req.block_table = []
