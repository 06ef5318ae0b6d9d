"""bench/router_scale.py's pure parts: deterministic workload, the growth fit, the table, and one
real decision on a tiny fleet (the real registry, index and policies)."""
import math

import pytest

from pdcluster.bench.router_scale import (Workload, build_fleet, chain, fit_exponent, prompts, table,
                                          time_decisions)
from pdcluster.router.placement import POLICY_NAMES


def test_workload_is_deterministic_per_seed():
    a, b, c = Workload.make(3, n_groups=8, long_blocks=32), Workload.make(3, n_groups=8, long_blocks=32), \
        Workload.make(4, n_groups=8, long_blocks=32)
    assert a == b and a != c
    assert a.worker_blocks(5, 200) == b.worker_blocks(5, 200) != a.worker_blocks(6, 200)
    assert prompts(a, 4, 10) == prompts(b, 4, 10)
    assert all(len(p) == 10 for p in prompts(a, 4, 10))


def test_workload_shares_prefixes_as_chains():
    wl = Workload.make(0, n_groups=4, long_blocks=16)
    convs = wl.worker_blocks(0, 300) + wl.worker_blocks(1, 300)
    assert len({h for c in wl.worker_blocks(0, 300) for h in c}) >= 300   # distinct blocks
    # every conversation starts with a whole group prefix, so workers share those blocks
    assert all(any(c[:len(g)] == list(g) for g in wl.groups) for c in convs)
    # a chain hash names its prefix: the same block id after different parents differs
    assert chain(1, [7]) != chain(2, [7]) and chain(1, [7, 8])[0] == chain(1, [7])[0]


def test_fit_exponent():
    xs = [10, 100, 1000]
    assert fit_exponent(xs, [3 * x for x in xs]) == pytest.approx(1.0)
    assert fit_exponent(xs, [0.5 * x * x for x in xs]) == pytest.approx(2.0)
    assert fit_exponent(xs, [7.0] * 3) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        fit_exponent([5, 5], [1.0, 2.0])


def test_table():
    t = table(["a", "b"], [[1, 2.345678], ["x", math.inf]])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2.346 |", "| x | inf |"]


def test_tiny_fleet_decides_with_every_policy():
    wl = Workload.make(0, n_groups=4, long_blocks=32)
    fleet = build_fleet(wl, 6, 600)
    assert len(fleet.registry.loads_of("prefill")) == 3 and len(fleet.registry.loads_of("decode")) == 3
    entries = sum(fleet.index.num_blocks(w) for w in fleet.index.workers)
    assert entries >= 600 and 0 < fleet.index.num_hashes() < entries   # workers share prefix blocks
    hashes = list(wl.long_doc[:20])
    for name in POLICY_NAMES:
        n, el = time_decisions(fleet, name, [hashes], 16, 0.0)
        assert n == 1 and el > 0
    # place()'s expect(): the worker that computes the prompt now holds its blocks
    choice = fleet.decide("cache-aware", hashes, 20 * 16, 1e6)
    assert fleet.index.match(hashes)[choice.prefill or choice.decode] == 20
