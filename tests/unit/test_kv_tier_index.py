"""The cache tiers' bookkeeping (kv_transfer/tiers/index.py, stats.py): slots, segmented LRU, pins. No torch."""
import sys

import pytest

from pdcluster.kv_transfer.tiers.index import TierIndex
from pdcluster.kv_transfer.tiers.stats import Histogram


def test_slots_then_lru_eviction():
    t = TierIndex(3)
    assert [t.insert(h) for h in (10, 11, 12)] == [(0, []), (1, []), (2, []), ]
    assert t.insert(13) == (0, [(10, 0)])           # LRU 10 goes, its slot is reused
    assert 10 not in t and t.get(13).slot == 0 and not t.get(13).ready
    assert t.insert(11) == (1, [])                  # held: only moves to MRU
    assert t.insert(14) == (2, [(12, 2)])           # so 12 (not 11) is the LRU now
    assert t.hashes() == [13, 11, 14]


def test_hit_protects_against_a_scan_of_new_blocks():
    t = TierIndex(4, protected_fraction=0.5)        # at most 2 protected
    for h in (1, 2, 3, 4):
        t.insert(h)
    t.hit(1)
    evicted = [t.insert(h)[1][0][0] for h in (5, 6, 7)]
    assert evicted == [2, 3, 4] and 1 in t          # blocks used once flush each other, not the reused one
    t.hit(5), t.hit(6), t.hit(7)                    # protected holds 2: its LRU is demoted to probation
    assert list(t.protected) == [6, 7] and list(t.probation) == [1, 5]
    assert t.insert(8)[1] == [(1, t.get(8).slot)]


def test_pinned_entries_are_never_evicted_or_removed():
    t = TierIndex(2)
    t.insert(1), t.insert(2)
    t.pin(1)
    assert t.insert(3)[1] == [(2, 1)]               # 1 is LRU but pinned: 2 goes
    t.pin(3)
    assert t.insert(4) is None                      # every entry pinned: no room, nothing changed
    assert t.remove(1) is None and 1 in t
    t.unpin(1)
    assert t.remove(1) == 0 and 1 not in t and len(t) == 1


def test_zero_capacity_and_bad_arguments():
    assert TierIndex(0).insert(1) is None
    with pytest.raises(ValueError):
        TierIndex(-1)
    with pytest.raises(ValueError):
        TierIndex(4, protected_fraction=1.5)


def test_histogram_buckets_are_cumulative():
    h = Histogram((0.001, 0.01))
    for s in (0.0005, 0.001, 0.005, 0.5):
        h.observe(s)
    assert h.cumulative() == [2, 3, 4] and h.sum == pytest.approx(0.5065)


def test_bookkeeping_imports_without_torch():
    import subprocess
    code = ("import sys; import pdcluster.kv_transfer.tiers.index, pdcluster.kv_transfer.tiers.stats; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
