"""BlockPool / KVCacheManager bookkeeping with tiny pools and exact block ids (no torch)."""
import pytest

from pdcluster.engine.block_pool import BlockPool
from pdcluster.engine.hashing import block_hashes, hash_block
from pdcluster.engine.kv_cache_manager import KVCacheManager
from pdcluster.engine.request import Request
from pdcluster.engine.sampling_params import SamplingParams


def req(tokens, salt=None, bs=4):
    return Request(list(tokens), SamplingParams(max_tokens=4), cache_salt=salt, block_size=bs)


def test_uncached_blocks_are_reused_most_recently_freed_first():
    p = BlockPool(4)
    a = p.allocate(2)
    assert [b.block_id for b in a] == [0, 1] and p.num_free_blocks == 2
    b = p.allocate(1)
    assert b[0].block_id == 2
    p.free(reversed(a))                       # tail first: 1 then 0; nothing cached: the blank stack
    assert list(p.blank) == [3, 1, 0] and not p.free_queue and p.num_free_blocks == 3
    assert [x.block_id for x in p.allocate(3)] == [0, 1, 3]     # warm memory first, the never-used block last
    with pytest.raises(RuntimeError):
        p.allocate(1)


def test_a_blank_block_is_taken_before_any_cached_one_is_evicted():
    events = []
    p = BlockPool(4, on_event=lambda kind, hs: events.append((kind, hs)))
    a = p.allocate(3)
    for blk, h in zip(a[:2], (11, 12)):
        p.cache_block(blk, h)
    p.free(reversed(a))                       # 2 uncached -> blank; 1, 0 cached -> free queue (LRU 1 first)
    assert list(p.free_queue) == [1, 0] and list(p.blank) == [3, 2]
    assert [x.block_id for x in p.allocate(2)] == [2, 3]          # blank ones: no eviction
    assert p.lookup(11) is not None and p.lookup(12) is not None and ("removed", [12]) not in events
    assert [x.block_id for x in p.allocate(1)] == [1]            # then the cached LRU, evicted
    assert p.lookup(12) is None and events[-1] == ("removed", [12])
    p.reset_prefix_cache()                    # the last cached free block forgets its hash: blank again
    assert list(p.blank) == [0] and not p.free_queue and p.lookup(11) is None


def test_double_free_rejected():
    p = BlockPool(2)
    (b,) = p.allocate(1)
    p.free([b])
    with pytest.raises(RuntimeError, match="double free"):
        p.free([b])


def test_chain_hash_depends_on_prefix_and_salt():
    toks = list(range(8))
    h = block_hashes(toks, 4)
    assert len(h) == 2 and h[1] == hash_block(h[0], toks[4:8])
    assert block_hashes([9, 9, 9, 9] + toks[4:8], 4)[1] != h[1]     # same block, other prefix
    assert block_hashes(toks, 4, salt="tenant-a") != h
    assert block_hashes(toks + [1, 2], 4) == h                       # partial block not hashed


def test_prefix_hit_reuses_exact_blocks_and_leaves_last_token():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r1 = req(range(10))                     # 2 full blocks + 2 tokens
    assert kv.can_allocate(r1, 10)
    assert kv.allocate(r1, 10) == [0, 1, 2]
    r1.num_computed_tokens = 10
    kv.cache_computed_blocks(r1)
    r2 = req(list(range(8)) + [77, 78, 79])
    hits = kv.computed_blocks(r2)
    assert [b.block_id for b in hits] == [0, 1]
    assert kv.can_allocate(r2, 3, hits)
    assert kv.allocate(r2, 3, hits) == [3]
    assert r2.block_ids == [0, 1, 3] and r2.num_computed_tokens == 8
    assert kv.pool.blocks[0].ref_cnt == 2
    # an exact full-block prompt still computes its last token: only 1 of 2 blocks is a hit
    r3 = req(range(8))
    assert [b.block_id for b in kv.computed_blocks(r3)] == [0]


def test_salt_isolates_tenants():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req(range(9), salt="a")
    kv.allocate(a, 9)
    a.num_computed_tokens = 9
    kv.cache_computed_blocks(a)
    assert len(kv.computed_blocks(req(range(9), salt="a"))) == 2
    assert kv.computed_blocks(req(range(9), salt="b")) == []
    assert kv.computed_blocks(req(range(9))) == []


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    events = []
    kv = KVCacheManager(num_blocks=3, block_size=4, on_event=lambda kind, hs: events.append((kind, len(hs))))
    r = req(range(9))
    kv.allocate(r, 9)
    r.num_computed_tokens = 9
    kv.cache_computed_blocks(r)
    kv.free(r)                               # tail first: 2 (partial, uncached) blank; 1, 0 cached
    assert list(kv.pool.free_queue) == [1, 0] and list(kv.pool.blank) == [2] and kv.num_free_blocks == 3
    r2 = req(list(range(8)) + [5])
    hits = kv.computed_blocks(r2)
    assert [b.block_id for b in hits] == [0, 1]
    # touching 2 free hit blocks leaves 1 free block: room for exactly 1 more
    assert kv.can_allocate(r2, 1, hits) and not kv.can_allocate(r2, 5, hits)
    kv.allocate(r2, 1, hits)
    assert r2.block_ids == [0, 1, 2] and kv.num_free_blocks == 0
    assert events == [("stored", 1), ("stored", 1)]
    kv.free(r2)
    other = req(range(100, 112))
    kv.allocate(other, 12)                   # evicts the cached blocks, LRU first
    assert other.block_ids == [2, 1, 0]
    assert ("removed", 2) in events
    assert kv.computed_blocks(req(range(9))) == []


# segmented LRU: prefix blocks a hit reused outlive blocks used once
def _run(kv, tokens):
    """Compute and cache a whole prompt as one request, then finish it; returns its block ids."""
    r = req(tokens)
    hits = kv.computed_blocks(r)
    n = r.num_tokens - len(hits) * kv.block_size
    kv.allocate(r, n, hits)
    r.num_computed_tokens = r.num_tokens
    kv.cache_computed_blocks(r)
    ids = list(r.block_ids)
    kv.free(r)
    return ids


def test_reused_prefix_survives_one_off_prompts_that_plain_lru_would_let_flush_it():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prefix = list(range(8))                              # 2 blocks
    _run(kv, prefix + [100, 101, 102, 103, 104])         # computes the prefix
    _run(kv, prefix + [200, 201, 202, 203, 204])         # hits it: its 2 blocks are now protected
    assert sorted(kv.pool.protected) == [0, 1]
    for k in range(6):                                   # 6 one-off prompts of 3 blocks each
        _run(kv, list(range(1000 + 20 * k, 1012 + 20 * k)))
    assert len(kv.computed_blocks(req(prefix + [300]))) == 2     # the shared prefix is still cached
    assert kv.num_free_blocks == 8 and not set(kv.pool.protected) & set(kv.pool.free_queue)

    lru = KVCacheManager(num_blocks=8, block_size=4, protected_fraction=0.0)   # plain LRU
    _run(lru, prefix + [100, 101, 102, 103, 104])
    _run(lru, prefix + [200, 201, 202, 203, 204])
    for k in range(6):
        _run(lru, list(range(1000 + 20 * k, 1012 + 20 * k)))
    assert lru.computed_blocks(req(prefix + [300])) == []


def test_protected_queue_is_capped_and_its_lru_ages_out():
    kv = KVCacheManager(num_blocks=8, block_size=4, protected_fraction=0.25)    # at most 2 protected
    a, b = list(range(8)), list(range(50, 58))
    for p in (a, b):                                     # both 2-block prefixes computed, then reused
        _run(kv, p + [1, 2])
        _run(kv, p + [3, 4])
    assert len(kv.pool.protected) == 2                   # b's blocks; a's were demoted to the free queue
    assert all(kv.pool.blocks[i].block_hash is not None for i in kv.pool.protected)
    _run(kv, list(range(900, 924)))                      # 6 fresh blocks: the whole free queue, a included
    assert len(kv.computed_blocks(req(b + [9]))) == 2
    assert kv.computed_blocks(req(a + [9])) == []
    with pytest.raises(ValueError, match="protected_fraction"):
        BlockPool(4, protected_fraction=1.5)


def test_allocation_falls_back_to_protected_blocks_and_reset_clears_them():
    events = []
    kv = KVCacheManager(num_blocks=4, block_size=4, on_event=lambda kind, hs: events.append((kind, len(hs))))
    prefix = list(range(8))
    _run(kv, prefix + [1])
    _run(kv, prefix + [2])
    assert sorted(kv.pool.protected) == [0, 1]
    r = req(range(500, 516))                             # needs all 4 blocks: takes the protected ones last
    kv.allocate(r, 16)
    assert r.block_ids[-2:] == [1, 0] and kv.num_free_blocks == 0 and not kv.pool.protected
    assert events[-1] == ("removed", 2)
    kv.free(r)
    _run(kv, prefix + [1])
    _run(kv, prefix + [2])
    assert kv.pool.protected
    kv.pool.reset_prefix_cache()
    assert not kv.pool.protected and kv.num_free_blocks == 4 and not kv.pool.cached


def test_evicting_cached_blocks_tells_on_evict_first_with_their_ids():
    calls = []
    p = BlockPool(3, on_event=lambda kind, hs: calls.append((kind, hs)))
    p.on_evict = lambda ids, hs: calls.append(("evict", ids, hs))
    a = p.allocate(3)
    p.cache_block(a[1], 11)
    p.cache_block(a[2], 12)
    p.free(a)
    calls.clear()
    p.allocate(2)                             # free queue LRU: block 0 (uncached), then 1 (cached)
    assert calls == [("evict", [1], [11]), ("removed", [11])]


def test_an_observer_that_raises_neither_leaks_the_allocated_blocks_nor_fails_the_caller(caplog):
    """Before, a raising on_evict / on_event propagated out of allocate after its blocks were taken off the
    free lists: the caller never got them, and they were lost to the pool for good."""
    def boom(*_):
        raise OSError("tier gone")

    p = BlockPool(3, on_event=boom)
    a = p.allocate(3)
    assert p.cache_block(a[0], 11) and p.lookup(11) is a[0]      # cached, though the feed raised
    p.free(a)
    p.on_evict = boom
    b = p.allocate(3)                                            # evicts 11: both observers raise
    assert len(b) == 3 and p.num_free_blocks == 0 and p.lookup(11) is None
    p.free(b)
    assert p.num_free_blocks == 3 and sum("observer" in r.message for r in caplog.records) == 3
