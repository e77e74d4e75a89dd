"""The KV block manager: a free list of fixed-size KV cache blocks and per-request tables.

The free list is a stack: the blocks freed last are handed out first, so a steady load keeps
reusing the same memory, which stays resident and warm in cache, instead of walking the whole
(lazily zero-mapped, on CPU) KV cache and faulting in pages every step."""

from __future__ import annotations

from epplat.core.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))   # pop() takes block 0 first

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
        req.block_table.extend(self.free.pop() for _ in range(n))
        return True

    def release(self, req: Request) -> None:
        self.free.extend(reversed(req.block_table))
        req.block_table = []
