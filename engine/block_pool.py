"""KV block pool: reference counts, prefix cache by chain hash, LRU eviction. Pure Python.

Invariants
- Every block is in exactly one of: in use (ref_cnt > 0), or the free queue (ref_cnt == 0).
- A free block may still be cached (its hash maps to it); allocating it evicts that entry.
- The free queue is LRU: blocks freed earliest are reused first. A request frees its blocks
  tail first, so a prefix's last blocks are evicted before its first ones (a shorter
  prefix stays usable longer).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True,
                 on_event: Callable[[str, list[int]], None] | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, Block] = {}           # chain hash -> block holding it
        self.on_event = on_event                      # ("stored"|"removed", hashes) for the router index
        self.hits = 0                                 # prefix-cache queried/hit tokens, for metrics
        self.queries = 0

    # queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def lookup(self, block_hash: int) -> Block | None:
        return self.cached.get(block_hash)

    # allocate / free
    def allocate(self, n: int) -> list[Block]:
        """n fresh blocks with ref_cnt 1 (evicting cached ones LRU). Caller checked capacity."""
        if n > len(self.free_queue):
            raise RuntimeError(f"allocate({n}) with only {len(self.free_queue)} free blocks")
        out, evicted = [], []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            b = self.blocks[block_id]
            if b.block_hash is not None:
                evicted.append(b.block_hash)
                del self.cached[b.block_hash]
                b.block_hash = None
            b.ref_cnt = 1
            out.append(b)
        if evicted and self.on_event:
            self.on_event("removed", evicted)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on cached blocks (a prefix hit), pulling free ones out of the queue."""
        for b in blocks:
            if b.ref_cnt == 0:
                del self.free_queue[b.block_id]
            b.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference on each block; blocks reaching 0 join the free queue in the given order."""
        for b in blocks:
            if b.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {b.block_id}")
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self.free_queue[b.block_id] = None

    def cache_block(self, block: Block, block_hash: int) -> None:
        """Register a full, computed block under its chain hash (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block
        if self.on_event:
            self.on_event("stored", [block_hash])

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash of unreferenced blocks (blocks in use keep theirs)."""
        removed = [h for h, b in self.cached.items() if b.ref_cnt == 0]
        for h in removed:
            self.cached.pop(h).block_hash = None
        if removed and self.on_event:
            self.on_event("removed", removed)
