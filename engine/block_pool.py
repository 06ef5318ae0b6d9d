"""KV block pool: reference counts, prefix cache by chain hash, LRU eviction. Pure Python.

Invariants
- Every block is in exactly one of: in use (ref_cnt > 0), the blank stack, the free queue, or the
  protected queue (the last three ref_cnt == 0).
- The blank stack holds free blocks that cache nothing (never computed, a prompt's partial last
  block, a forgotten hash). Allocation takes them first, the most recently freed first: no cached
  block is evicted while a blank one is free, and recently written memory is reused while it is
  still mapped and in the CPU's caches (a never-used block's pages fault on first write: on CPU the
  pool is lazily zeroed memory, ~2 ms per MiB; cycling through the whole pool paid that on every
  block until each had been written once).
- A block in the free or protected queue is cached (its hash maps to it); allocating it evicts
  that entry.
- Eviction is segmented LRU (SLRU). A cached block that a prefix hit has reused (`reused`) joins
  the protected queue when freed; every other free block (uncached, or cached and never hit:
  a prompt's own suffix, generated tokens) joins the free queue. Allocation takes the free
  queue's LRU end after the blank stack, and the protected queue's only when both are empty, so blocks
  used once cannot flush a prefix that requests share. The protected queue holds at most
  `protected_fraction` of the pool; past that its LRU blocks are demoted to the free queue's
  MRU end, so a prefix that stopped being used still ages out and a new one gets room.
- Within each queue: blocks freed earliest are reused first. A request frees its blocks tail
  first, so a prefix's last blocks are evicted before its first ones (a shorter prefix stays
  usable longer).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Iterable

log = logging.getLogger(__name__)


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "reused", "gen")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.reused = False          # a prefix hit took it since it was cached (-> protected when freed)
        self.gen = 0                 # +1 each time allocate() hands it out, before anything writes it: a
                                     # reader off the engine thread (engine/peer_read.py) checks it did not move

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True,
                 on_event: Callable[[str, list[int]], None] | None = None, protected_fraction: float = 0.9):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if not 0.0 <= protected_fraction <= 1.0:
            raise ValueError(f"protected_fraction must be in [0, 1], got {protected_fraction}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.blank: dict[int, None] = dict.fromkeys(reversed(range(num_blocks)))   # a stack: popitem() takes the last
        self.free_queue: OrderedDict[int, None] = OrderedDict()   # free, cached, not reused: LRU first
        self.protected: OrderedDict[int, None] = OrderedDict()   # free, cached and reused
        self.max_protected = int(protected_fraction * num_blocks)
        self.cached: dict[int, Block] = {}           # chain hash -> block holding it
        self.on_event = on_event                      # ("stored"|"removed", hashes) for the router index
        # (block ids, hashes) of cached blocks allocate() is about to hand out, while their KV is
        # still intact: a lower cache tier copies them out here (engine/kv_connector.py `evicted`)
        self.on_evict: Callable[[list[int], list[int]], None] | None = None
        self.hits = 0                                 # prefix-cache queried/hit tokens, for metrics
        self.queries = 0

    # queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.blank) + len(self.free_queue) + len(self.protected)

    @property
    def num_free_cached_blocks(self) -> int:
        """Free blocks that hold a cached prefix block: counted free, yet a prompt that hits one takes it."""
        return len(self.free_queue) + len(self.protected)

    def lookup(self, block_hash: int) -> Block | None:
        return self.cached.get(block_hash)

    # allocate / free
    def allocate(self, n: int) -> list[Block]:
        """n fresh blocks with ref_cnt 1 (evicting cached ones LRU). Caller checked capacity."""
        if n > self.num_free_blocks:
            raise RuntimeError(f"allocate({n}) with only {self.num_free_blocks} free blocks")
        out, evicted, evicted_ids = [], [], []
        for _ in range(n):
            if self.blank:
                block_id, _ = self.blank.popitem()
            else:
                block_id, _ = (self.free_queue or self.protected).popitem(last=False)
            b = self.blocks[block_id]
            if b.block_hash is not None:
                evicted.append(b.block_hash)
                evicted_ids.append(block_id)
                del self.cached[b.block_hash]
                b.block_hash = None             # unhashed before gen moves: see engine/peer_read.py
            b.gen += 1
            b.reused = False
            b.ref_cnt = 1
            out.append(b)
        if evicted:
            _tell(self.on_evict, evicted_ids, evicted)
            _tell(self.on_event, "removed", evicted)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on cached blocks (a prefix hit), pulling free ones out of the queue."""
        for b in blocks:
            if b.ref_cnt == 0:
                for q in (self.protected, self.free_queue, self.blank):
                    if b.block_id in q:
                        del q[b.block_id]
                        break
            if b.block_hash is not None:
                b.reused = True
            b.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference on each block; blocks reaching 0 join, in the given order, the blank stack
        (uncached), the protected queue (cached and reused) or the free queue (cached)."""
        for b in blocks:
            if b.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {b.block_id}")
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                if b.block_hash is None:
                    self.blank[b.block_id] = None
                elif b.reused:
                    self.protected[b.block_id] = None
                else:
                    self.free_queue[b.block_id] = None
        while len(self.protected) > self.max_protected:      # demote the protected LRU: it ages out
            block_id, _ = self.protected.popitem(last=False)
            self.blocks[block_id].reused = False
            self.free_queue[block_id] = None

    def cache_block(self, block: Block, block_hash: int) -> bool:
        """Register a full, computed block under its chain hash (first writer wins). True if it is new."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return False
        block.block_hash = block_hash
        self.cached[block_hash] = block
        _tell(self.on_event, "stored", [block_hash])
        return True

    def reset_prefix_cache(self, only: set[int] | None = None) -> None:
        """Forget the cached hashes of unreferenced blocks, every one or those in `only` (blocks in
        use keep theirs)."""
        removed = [h for h, b in self.cached.items() if b.ref_cnt == 0 and (only is None or h in only)]
        for h in removed:
            b = self.cached.pop(h)
            b.block_hash, b.reused = None, False
            self.protected.pop(b.block_id, None)         # uncached now: a blank block
            self.free_queue.pop(b.block_id, None)
            self.blank[b.block_id] = None
        if removed:
            _tell(self.on_event, "removed", removed)


def _tell(observer: Callable | None, *args) -> None:
    """Call an observer (a lower tier's copy-out, the router's event feed) after the pool's state is
    whole: one that raises is logged, never lets the error undo or leak what the pool just did (an
    allocate whose caller never got its blocks)."""
    if observer is not None:
        try:
            observer(*args)
        except Exception:
            log.exception("block pool observer %r failed", observer)
