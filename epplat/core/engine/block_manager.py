"""The KV block manager: fixed-size KV cache blocks, per-request tables and the prefix cache.

Prefix caching (vLLM's automatic prefix caching): a full block is named by a hash chained
over its token ids and its parent block's hash, so equal names mean equal prefixes and
therefore equal keys and values. A new request starts from the blocks of its longest
cached prefix (shared, reference-counted) and computes only the rest. A freed block that
holds a named prefix stays findable until the free pool runs dry; then the least recently
freed such block is evicted (LRU).

Blocks that never held a named prefix are kept as a stack: the blocks freed last are handed
out first, so a steady load keeps reusing the same memory, which stays resident and warm in
cache, instead of walking the whole (lazily zero-mapped, on CPU) KV cache and faulting in
pages every step. They are handed out before any cached block is evicted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from epplat.core.engine.request import Request


def block_hash(parent: bytes, token_ids) -> bytes:
    """The name of a full block: its tokens and its parent's name (b"" for the first block)."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))   # unnamed free blocks; pop() takes block 0 first
        self.evictable: OrderedDict[int, None] = OrderedDict()       # free named blocks, least recently freed first
        self.refs = [0] * num_blocks
        self.name_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.queries = 0    # prompt tokens of admitted requests (vLLM's prefix_cache_queries)
        self.hits = 0       # of which were found cached (prefix_cache_hits)
        self.recent: deque[tuple[int, int]] = deque(maxlen=1000)   # (queries, hits) of the last admissions

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    @property
    def recent_hit_rate(self) -> float:
        """Hits per queried prompt token over the last 1,000 admissions (the log's rate, as vLLM's)."""
        queries = sum(q for q, _ in self.recent)
        return sum(h for _, h in self.recent) / queries if queries else 0.0

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_table))

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def _take(self) -> int:
        if self.free:
            b = self.free.pop()
        else:
            b, _ = self.evictable.popitem(last=False)
            del self.block_of[self.name_of.pop(b)]
        self.refs[b] = 1
        return b

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Grow req's block table to hold num_new_tokens more tokens; False if out of blocks."""
        n = self.blocks_needed(req, num_new_tokens)
        if n > self.num_free:
            return False
        req.block_table.extend(self._take() for _ in range(n))
        return True

    def release(self, req: Request) -> None:
        """Drop req's blocks, the last block first (so a request's tail is evicted before its head)."""
        for b in reversed(req.block_table):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.name_of:
                    self.evictable[b] = None
                else:
                    self.free.append(b)
        req.block_table = []
        req.num_named_blocks = 0

    def names(self, req: Request) -> list[bytes]:
        """The names of req's full blocks (of its tokens so far), extended as the request grows."""
        names, bs = req.block_names, self.block_size
        while (len(names) + 1) * bs <= req.num_tokens:
            i = len(names)
            names.append(block_hash(names[-1] if names else b"", req.token_ids[i * bs:(i + 1) * bs]))
        return names

    def cached_prefix(self, req: Request) -> list[int]:
        """The cached blocks of req's longest cached prefix; never all of its tokens (the last one is
        computed, to sample from)."""
        if not self.enable_prefix_caching:
            return []
        hit = []
        for name in self.names(req)[:(req.num_tokens - 1) // self.block_size]:
            b = self.block_of.get(name)
            if b is None:
                break
            hit.append(b)
        return hit

    def admit(self, req: Request, hit: list[int], num_new_tokens: int) -> bool:
        """Start a waiting request (nothing computed) from the cached blocks `hit` of its prefix and room for
        num_new_tokens after them; False (and nothing changed) if the blocks do not fit."""
        cached = len(hit) * self.block_size
        need = -(-(cached + num_new_tokens) // self.block_size) - len(hit)
        if need > self.num_free - sum(self.refs[b] == 0 for b in hit):
            return False
        for b in hit:
            if self.refs[b] == 0:
                del self.evictable[b]
            self.refs[b] += 1
        req.block_table = list(hit)
        req.num_computed = req.num_cached_tokens = cached
        req.num_named_blocks = len(hit)
        if self.enable_prefix_caching:
            self.queries += req.num_tokens
            self.hits += cached
            self.recent.append((req.num_tokens, cached))
        return self.allocate(req, num_new_tokens)

    def cache_full_blocks(self, req: Request) -> None:
        """Name the blocks of req that became full of computed tokens, so later requests can find them."""
        if not self.enable_prefix_caching:
            return
        full = min(req.num_computed, req.num_tokens) // self.block_size   # (pending tokens are not known here)
        if full <= req.num_named_blocks:
            return
        names = self.names(req)
        for i in range(req.num_named_blocks, full):
            b, name = req.block_table[i], names[i]
            if name not in self.block_of and b not in self.name_of:   # the first copy of a prefix is the cached one
                self.block_of[name], self.name_of[b] = b, name
        req.num_named_blocks = full
