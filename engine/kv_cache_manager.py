"""Request-level KV bookkeeping on top of the BlockPool. Pure Python.

A request owns `req.block_ids` (position order). Blocks [0, n_hit) may be shared prefix-cache
blocks; the rest are its own. `can_allocate`/`allocate` come in pairs: the scheduler asks first,
so an allocation never fails half way.
"""
from __future__ import annotations

from typing import Callable

from pdcluster.engine.block_pool import Block, BlockPool
from pdcluster.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, on_event=None,
                 protected_fraction: float = 0.9):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching, on_event, protected_fraction)
        self.enable_caching = enable_caching
        # (block ids, hashes) of a request's blocks just published, once per cache_computed_blocks
        # call: a lower cache tier that writes through copies them out (engine/kv_connector.py `computed`)
        self.on_cached: Callable[[list[int], list[int]], None] | None = None

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_free_cached_blocks(self) -> int:
        return self.pool.num_free_cached_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def computed_blocks(self, req: Request, count: bool = True) -> list[Block]:
        """Longest run of cached blocks for req's leading full blocks, leaving >= 1 token to compute
        (the last token must run through the model to produce logits). With `count`, the lookup is
        counted in pool.queries / pool.hits (tokens), once per call as vLLM does: a request retried
        at the head of the waiting queue counts again (`count_lookup` counts one made uncounted)."""
        if not self.enable_caching:
            return []
        hits = []
        for h in req.block_hashes()[:self.max_hit_blocks(req)]:
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
        if count:
            self.count_lookup(req, len(hits))
        return hits

    def max_hit_blocks(self, req: Request) -> int:
        """Leading full blocks a prefix hit may cover: all but the block of the last token; none while the
        request's prompt logprobs are to be computed."""
        return 0 if req.wants_prompt_logprobs else (req.num_tokens - 1) // self.block_size

    def count_lookup(self, req: Request, num_hit_blocks: int) -> None:
        self.pool.queries += req.num_tokens
        self.pool.hits += num_hit_blocks * self.block_size

    def blocks_needed(self, req: Request, num_new_tokens: int, num_hit_blocks: int = 0) -> int:
        """Fresh blocks to hold num_new_tokens after the computed ones (or after the hit blocks,
        on first admission)."""
        computed = num_hit_blocks * self.block_size if num_hit_blocks else req.num_computed_tokens
        have = num_hit_blocks if num_hit_blocks else len(req.block_ids)
        return max(0, cdiv(computed + num_new_tokens, self.block_size) - have)

    def can_allocate(self, req: Request, num_new_tokens: int, hits: list[Block] = ()) -> bool:
        # Hit blocks that sit in the free queue stop being free when touched.
        hits_from_free = sum(1 for b in hits if b.ref_cnt == 0)
        need = self.blocks_needed(req, num_new_tokens, len(hits))
        return need + hits_from_free <= self.pool.num_free_blocks

    def allocate(self, req: Request, num_new_tokens: int, hits: list[Block] = ()) -> list[int]:
        """Give req room for num_new_tokens more tokens. On first admission `hits` (from
        computed_blocks) become its leading blocks and num_computed_tokens skips over them.
        Returns the newly allocated block ids."""
        if hits:
            assert not req.block_ids and req.num_computed_tokens == 0
            self.pool.touch(hits)
            req.block_ids = [b.block_id for b in hits]
            req.num_computed_tokens = len(hits) * self.block_size
        need = self.blocks_needed(req, num_new_tokens)
        new = self.pool.allocate(need)
        req.block_ids += [b.block_id for b in new]
        return [b.block_id for b in new]

    def cache_computed_blocks(self, req: Request) -> None:
        """Publish req's full blocks whose KV is computed under their chain hashes."""
        if not self.enable_caching:
            return
        n_full = min(req.num_computed_tokens, req.num_tokens) // self.block_size
        hashes = req.block_hashes()
        new_ids, new_hashes = [], []
        for i in range(min(n_full, len(hashes), len(req.block_ids))):
            if self.pool.cache_block(self.pool.blocks[req.block_ids[i]], hashes[i]):
                new_ids.append(req.block_ids[i])
                new_hashes.append(hashes[i])
        if new_ids and self.on_cached is not None:
            self.on_cached(new_ids, new_hashes)

    def free(self, req: Request) -> None:
        """Release req's blocks, tail first (so the prefix head outlives its tail in the LRU)."""
        self.pool.free(self.pool.blocks[i] for i in reversed(req.block_ids))
        req.block_ids = []
