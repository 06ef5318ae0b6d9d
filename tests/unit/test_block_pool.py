"""BlockPool / KVCacheManager bookkeeping with tiny pools and exact block ids (no torch)."""
import pytest

from engine.block_pool import BlockPool
from engine.hashing import block_hashes, hash_block
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams


def req(tokens, salt=None, bs=4):
    return Request(list(tokens), SamplingParams(max_tokens=4), cache_salt=salt, block_size=bs)


def test_allocate_free_lru_order():
    p = BlockPool(4)
    a = p.allocate(2)
    assert [b.block_id for b in a] == [0, 1] and p.num_free_blocks == 2
    b = p.allocate(1)
    assert b[0].block_id == 2
    p.free(reversed(a))                       # tail first: 1 then 0
    assert list(p.free_queue) == [3, 1, 0]
    assert [x.block_id for x in p.allocate(3)] == [3, 1, 0]
    with pytest.raises(RuntimeError):
        p.allocate(1)


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
    kv.free(r)                               # free queue order: 2, 1, 0 (tail first)
    assert list(kv.pool.free_queue) == [2, 1, 0] and kv.num_free_blocks == 3
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
