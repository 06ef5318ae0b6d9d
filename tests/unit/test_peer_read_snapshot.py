"""engine/peer_read.py's off-thread read check, on the pure-Python BlockPool: a snapshot row stays
valid only while its block still holds that hash and was not handed out since."""
import pytest

from pdcluster.engine.block_pool import BlockPool
from pdcluster.engine.peer_read import snapshot, unmoved

pytestmark = pytest.mark.timeout(30)


def _pool_with(hashes, num_blocks=4):
    pool = BlockPool(num_blocks)
    blocks = pool.allocate(len(hashes))
    for b, h in zip(blocks, hashes):
        pool.cache_block(b, h)
    pool.free(blocks)                           # cached, free: the next allocate may evict them
    return pool


def test_rows_of_untouched_blocks_stay_valid_and_missing_hashes_are_skipped():
    pool = _pool_with([11, 12])
    snap = snapshot(pool, [11, 99, 12])
    assert [i for i, _, _ in snap] == [0, 2]
    assert unmoved(snap, [11, 99, 12]) == [True, True]


def test_a_block_handed_out_after_the_snapshot_is_dropped():
    pool = _pool_with([11, 12], num_blocks=2)
    snap = snapshot(pool, [11, 12])
    pool.allocate(1)                            # evicts the free queue's LRU end: 11's block
    assert unmoved(snap, [11, 12]) == [False, True]


def test_a_block_evicted_and_cached_again_under_the_same_hash_is_dropped():
    """Its gen moved, so the copy may have read it mid-rewrite although the hash is back."""
    pool = _pool_with([11], num_blocks=1)
    snap = snapshot(pool, [11])
    (b,) = pool.allocate(1)
    pool.cache_block(b, 11)
    assert pool.lookup(11) is b and unmoved(snap, [11]) == [False]


def test_a_forgotten_hash_is_dropped():
    pool = _pool_with([11, 12])
    snap = snapshot(pool, [11, 12])
    pool.reset_prefix_cache(only={12})
    assert unmoved(snap, [11, 12]) == [True, False]
