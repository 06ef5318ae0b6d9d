"""router.prefix_index: exact answers with tiny hash lists, salts, silent workers, event gaps."""
import math

import pytest

from pdcluster.engine.block_pool import BlockPool
from pdcluster.engine.hashing import block_hashes
from pdcluster.engine.kv_cache_manager import KVCacheManager
from pdcluster.engine.request import Request
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.router.prefix_index import PrefixIndex

pytestmark = pytest.mark.timeout(60)


def idx(**kw):
    return PrefixIndex(silent_after_s=5.0, tau_s=10.0, horizon_s=100.0, **kw)


def test_match_every_worker_in_one_pass():
    ix = idx()
    ix.apply("a", "stored", [1, 2, 3], now=0)
    ix.apply("b", "stored", [1, 2], now=0)
    ix.apply("c", "stored", [2, 3], now=0)      # holds later blocks but not block 0: no prefix
    ix.add_worker("d", now=0)
    assert ix.match([1, 2, 3, 4]) == {"a": 3, "b": 2, "c": 0, "d": 0}
    assert ix.match([1, 9, 3]) == {"a": 1, "b": 1, "c": 0, "d": 0}
    assert ix.match([]) == {"a": 0, "b": 0, "c": 0, "d": 0}
    assert ix.match([1, 2, 3], workers=["b", "zz"]) == {"b": 2, "zz": 0}
    ix.apply("a", "removed", [2], now=0)       # a hole ends a's prefix there
    assert ix.match([1, 2, 3]) == {"a": 1, "b": 2, "c": 0, "d": 0}
    assert ix.holders(1) == {"a", "b"} and ix.holders(2) == {"b", "c"}
    assert ix.num_blocks("a") == 2


def test_removed_unknown_and_stored_twice_are_idempotent():
    ix = idx()
    ix.apply("a", "stored", [1, 1, 2], now=0)
    ix.apply("a", "stored", [1], now=0)
    ix.apply("a", "removed", [7], now=0)
    assert ix.num_blocks("a") == 2 and ix.match([1, 2]) == {"a": 2}
    with pytest.raises(ValueError):
        ix.apply("a", "evicted", [1])


def test_remove_worker_forgets_everything():
    ix = idx()
    ix.apply("a", "stored", [1, 2], now=0)
    ix.apply("b", "stored", [1], now=0)
    ix.remove_worker("a")
    assert ix.workers == ["b"] and ix.holders(2) == frozenset() and ix.match([1, 2]) == {"b": 1}
    assert ix.confidence("a", 0) == 0.0


def test_follows_a_real_block_pool_and_salts_never_cross():
    """Events straight from BlockPool(on_event=...), hashes from engine.hashing with per-tenant salts."""
    ix, bs = idx(), 4
    seq = iter(range(1, 1000))
    kv = KVCacheManager(num_blocks=8, block_size=bs,
                        on_event=lambda kind, hs: ix.apply("w0", kind, hs, seq=next(seq), now=0))
    toks = list(range(100, 113))                         # 3 full blocks + 1 token
    r = Request(toks, SamplingParams(max_tokens=1), cache_salt="tenant-a", block_size=bs)
    kv.allocate(r, len(toks))
    r.num_computed_tokens = len(toks)
    kv.cache_computed_blocks(r)
    a = block_hashes(toks, bs, "tenant-a")
    assert ix.match(a) == {"w0": 3} and ix.is_exact("w0", 0)
    assert ix.match(block_hashes(toks, bs, "tenant-b")) == {"w0": 0}     # other tenant: no hit
    assert ix.match(block_hashes(toks, bs)) == {"w0": 0}                 # no salt: no hit either
    kv.free(r)
    kv.pool.allocate(8)                                  # evicts every cached block -> "removed"
    assert ix.match(a) == {"w0": 0} and ix.num_blocks("w0") == 0


def test_reset_prefix_cache_event():
    ix = idx()
    pool = BlockPool(4, on_event=lambda kind, hs: ix.apply("w", kind, hs, now=0))
    b = pool.allocate(2)
    pool.cache_block(b[0], 11)
    pool.cache_block(b[1], 12)
    assert ix.match([11, 12]) == {"w": 2}
    pool.free(b)
    pool.reset_prefix_cache()
    assert ix.match([11, 12]) == {"w": 0}


def test_silent_worker_decays_then_drops():
    ix = idx()
    ix.apply("a", "stored", [1, 2], now=0)
    assert ix.confidence("a", 4.0) == 1.0 and ix.is_exact("a", 4.0)
    assert not ix.is_exact("a", 6.0)
    assert ix.confidence("a", 10.0) == pytest.approx(math.exp(-10.0 / 10.0))   # age since last heard
    assert ix.match([1, 2]) == {"a": 2}                                         # still answers...
    assert ix.match_weighted([1, 2], now=10.0)["a"] == pytest.approx(2 * math.exp(-1.0))  # ...discounted
    ix.heartbeat("a", now=20.0)                                                 # heard again: exact
    assert ix.confidence("a", 20.0) == 1.0
    assert ix.confidence("a", 121.0) == 0.0                                     # past the horizon
    assert ix.expire(now=121.0) == ["a"] and ix.num_blocks("a") == 0
    assert ix.needs_resync() == ["a"]
    ix.resync("a", [1], seq=None, now=130.0)
    assert ix.needs_resync() == [] and ix.match([1, 2]) == {"a": 1} and ix.is_exact("a", 130.0)


def test_sequence_gap_marks_approximate_until_resync():
    ix = idx()
    ix.apply("a", "stored", [1], seq=1, now=0)
    ix.apply("a", "stored", [2], seq=2, now=0)
    assert not ix.apply("a", "stored", [9], seq=2, now=0)      # repeated seq: ignored
    assert ix.is_exact("a", 0) and ix.match([1, 2]) == {"a": 2}
    ix.apply("a", "stored", [3], seq=5, now=1.0)               # 3 and 4 were lost
    assert not ix.is_exact("a", 1.0) and ix.needs_resync() == ["a"]
    assert ix.match([1, 2, 3]) == {"a": 3}                     # the event after the gap still applies
    assert ix.confidence("a", 11.0) == pytest.approx(math.exp(-1.0))
    ix.heartbeat("a", seq=5, now=11.0)                         # heartbeats keep it alive, not exact
    assert not ix.is_exact("a", 11.0)
    ix.resync("a", [1, 2], seq=7, now=12.0)                    # snapshot at seq 7
    assert ix.is_exact("a", 12.0) and ix.match([1, 2, 3]) == {"a": 2}
    assert not ix.apply("a", "stored", [3], seq=7, now=12.0)   # already in the snapshot
    ix.apply("a", "stored", [3], seq=8, now=12.0)
    assert ix.is_exact("a", 12.0) and ix.match([1, 2, 3]) == {"a": 3}


def test_heartbeat_seq_reveals_lost_tail_and_late_join():
    ix = idx()
    ix.apply("a", "stored", [1], seq=1, now=0)
    ix.heartbeat("a", seq=1, now=1)
    assert ix.is_exact("a", 1)
    ix.heartbeat("a", seq=3, now=2)                            # events 2 and 3 never arrived
    assert not ix.is_exact("a", 2)
    ix.apply("b", "stored", [1], seq=4, now=0)                 # first event seen is #4: 1..3 missed
    assert ix.needs_resync() == ["a", "b"]
    ix.heartbeat("c", seq=0, now=0)                            # a fresh worker: nothing missed
    assert ix.is_exact("c", 0)


def test_expected_blocks_count_at_once_until_confirmed_removed_or_expired():
    index = PrefixIndex(expect_ttl_s=10.0)
    index.add_worker("a", now=0.0)
    index.add_worker("b", now=0.0)
    prompt = [11, 12, 13]
    index.expect("a", prompt, now=1.0)                      # placed on a: its prefill is in flight
    assert index.match(prompt) == {"a": 3, "b": 0}
    index.apply("a", "stored", [11, 12], seq=1, now=2.0)    # two blocks confirmed by the worker
    index.expect("b", [11], now=2.0)
    index.apply("b", "removed", [11], seq=1, now=3.0)       # evicted before it was confirmed
    assert index.match(prompt) == {"a": 3, "b": 0} and index.pending("a") == {13} and not index.pending("b")
    index.expire(now=11.5)                                   # block 13 was never confirmed: gone
    assert index.match(prompt) == {"a": 2, "b": 0} and index.holders(13) == frozenset()
    index.expire(now=100.0)
    assert index.match(prompt)["a"] == 2                     # confirmed blocks stay
    index.expect("a", [11, 12, 99], now=100.0)
    index.resync("a", [11], seq=5, now=101.0)               # a snapshot replaces tentative entries too
    index.expire(now=200.0)
    assert index.match([11, 12]) == {"a": 1, "b": 0}



def test_a_second_expect_moves_only_the_still_tentative_expiries():
    """expect() on blocks partly expected before: the still-tentative ones expire ttl after the new
    call, a confirmed one stays confirmed (never expires), a new one is tentative from now."""
    index = PrefixIndex(expect_ttl_s=10.0)
    index.expect("a", [1, 2, 3], now=0.0)
    index.apply("a", "stored", [1], seq=1, now=1.0)          # 1 confirmed
    index.expect("a", [1, 2, 3, 4], now=5.0)
    assert index.pending("a") == {2, 3, 4}
    index.expire(now=12.0)                                   # past 0 + 10: 2 and 3 moved to 15, so kept
    assert index.match([1, 2, 3, 4]) == {"a": 4} and index.pending("a") == {2, 3, 4}
    index.expire(now=16.0)
    assert index.match([1, 2, 3, 4]) == {"a": 1} and index.pending("a") == frozenset()
    assert index.holders(2) == index.holders(4) == frozenset() and index.holders(1) == {"a"}

def test_unexpect_withdraws_one_claim_and_never_a_confirmed_block():
    """A placement that fails before its worker computes the prompt withdraws its expect()'s claim: the
    blocks stop counting at once, not expect_ttl_s later. A block expected twice (a sibling choice, a
    second prompt with the prefix) stays until both claims are withdrawn; a confirmed one stays."""
    index = PrefixIndex(expect_ttl_s=30.0)
    index.add_worker("b", now=0.0)
    index.apply("a", "stored", [1], seq=1, now=0.0)            # 1 held for real
    x = index.expect("a", [1, 2, 3], now=1.0)                   # prompt x: 2 and 3 tentative
    y = index.expect("a", [1, 2, 4], now=1.5)                   # prompt y shares 2
    assert set(x) == {2, 3} and set(y) == {2, 4}                # 1 is confirmed: nobody's claim
    index.unexpect("a", x)                                      # x failed
    assert index.match([1, 2, 3]) == {"a": 2, "b": 0} and index.pending("a") == {2, 4}
    assert index.holders(3) == frozenset() and index.holders(1) == {"a"}
    index.unexpect("a", y)                                      # y failed too
    assert index.match([1, 2, 4]) == {"a": 1, "b": 0} and index.pending("a") == frozenset()
    p, q = index.expect("a", [5, 6], now=2.0), index.expect("a", [5, 6], now=2.0)
    index.apply("a", "stored", [5], seq=2, now=2.5)             # confirmed: its claims go with it
    index.unexpect("a", p)
    assert index.pending("a") == {6} and index.match([5, 6]) == {"a": 2, "b": 0}
    index.unexpect("a", q)
    assert index.match([5, 6]) == {"a": 1, "b": 0} and index.pending("a") == frozenset()
    index.unexpect("a", q)                                      # withdrawn already: no change
    index.unexpect("c", q)                                      # an unknown worker: no change
    assert index.match([5, 6]) == {"a": 1, "b": 0}


@pytest.mark.parametrize("between", ["cached then evicted", "stored then removed", "resync", "expired"])
def test_a_claim_never_withdraws_an_entry_made_after_it(between):
    """Placement A's claim is stale once its entry is gone; placement B, expecting the same blocks
    since, keeps them when A fails (before, A's take-back dropped B's: same-prefix prompts then went
    elsewhere while B prefilled)."""
    index = PrefixIndex(expect_ttl_s=30.0)
    hs = [11, 12, 13]
    if between == "cached then evicted":
        index.apply("w", "stored", hs, seq=1, now=0.0)
        a = index.expect("w", hs, now=1.0)                      # held: A counts nothing
        index.apply("w", "removed", hs, seq=2, now=2.0)
    elif between == "stored then removed":
        a = index.expect("w", hs, now=1.0)
        index.apply("w", "stored", hs, seq=1, now=2.0)
        index.apply("w", "removed", hs, seq=2, now=3.0)
    elif between == "resync":
        a = index.expect("w", hs, now=1.0)
        index.resync("w", [], seq=5, now=2.0)
    else:
        a = index.expect("w", hs, now=1.0)
        index.expire(now=40.0)
    index.expect("w", hs, now=41.0)                             # B
    index.unexpect("w", a)                                      # A fails late
    assert index.match(hs)["w"] == 3 and index.pending("w") == set(hs)


# cache tiers (issue 19 point 2)
def test_tiered_events_and_the_walk_through_tiers():
    ix = idx()
    ix.apply("a", "stored", [1, 2], now=0)
    ix.apply("a", "stored", [2, 3], now=0, tier="host")        # 2 on device and host
    ix.apply("a", "stored", [4], now=0, tier="disk")
    ix.apply("b", "stored", [1], now=0, tier="disk")
    ix.apply("b", "stored", [2], now=0)                         # on device only, past b's device prefix
    ix.add_worker("c", now=0)
    assert ix.match([1, 2, 3, 4, 5]) == {"a": 2, "b": 0, "c": 0}    # device only, as before tiers
    hits = ix.match_tiers([1, 2, 3, 4, 5])
    # a: device prefix 1, 2, then 3 from host, 4 from disk; b: 1 from disk, then 2 is not in a lower
    # tier and its pool's lookup stopped at 1: the hit ends
    assert hits == {"a": (2, 1, 1), "b": (0, 0, 1), "c": (0, 0, 0)}
    assert hits["a"].total == 4 and hits["b"].total == 1
    ix.apply("b", "stored", [2], now=0, tier="host")
    assert ix.match_tiers([1, 2, 3])["b"] == (0, 1, 1)
    assert ix.tiers_of("a", 2) == {"device", "host"} and ix.tiers_of("c", 2) == frozenset()
    assert (ix.num_blocks("a"), ix.num_blocks("a", "host"), ix.num_blocks("a", "disk"),
            ix.num_blocks("a", "lower")) == (2, 2, 1, 3)
    # each tier's events change that tier only
    ix.apply("a", "removed", [2], now=0)                        # evicted from device, still on host
    assert ix.match_tiers([1, 2, 3, 4])["a"] == (1, 2, 1)
    ix.apply("a", "removed", [3], now=0, tier="host")           # the chain breaks at 3
    assert ix.match_tiers([1, 2, 3, 4])["a"] == (1, 1, 0)
    ix.apply("a", "stored", [3], now=0, tier="disk")
    assert ix.match_tiers([1, 2, 3, 4], workers=["a"]) == {"a": (1, 1, 2)}
    with pytest.raises(ValueError, match="tier"):
        ix.apply("a", "stored", [1], tier="tape")


def test_lower_tiers_are_forgotten_with_the_worker_and_replaced_by_a_resync():
    ix = idx()
    ix.apply("a", "stored", [1], seq=1, now=0)
    ix.apply("a", "stored", [2, 3], seq=2, now=0, tier="host")
    ix.apply("b", "stored", [1, 2], seq=1, now=0, tier="host")
    ix.resync("a", [1, 2], seq=5, now=0, lower={"disk": [3]})   # the snapshot says where each block is
    assert ix.match_tiers([1, 2, 3]) == {"a": (2, 0, 1), "b": (0, 2, 0)}
    ix.resync("a", [1], seq=6, now=0)                           # no lower tiers in it: none kept
    assert ix.match_tiers([1, 2, 3])["a"] == (1, 0, 0) and ix.num_blocks("a", "lower") == 0
    ix.remove_worker("b")
    assert ix.match_tiers([1, 2, 3]) == {"a": (1, 0, 0)} and ix.tiers_of("b", 1) == frozenset()
    # a worker past the horizon drops its lower tiers too
    ix.apply("a", "stored", [2], seq=7, now=0, tier="disk")
    assert ix.match_tiers([1, 2])["a"] == (1, 0, 1)
    assert ix.expire(now=1000) == ["a"] and ix.match_tiers([1, 2])["a"] == (0, 0, 0)
    assert not ix._lower and not ix._lower_by_worker.get("a")


def test_registry_ingests_tier_events_from_a_worker_status():
    """WorkerRegistry._ingest (the status poll's path) over a msgpack round trip of a real BlockEventLog."""
    from prometheus_client import CollectorRegistry

    from pdcluster.engine.block_events import BlockEventLog
    from pdcluster.messages import EngineFigures, WorkerStatus
    from pdcluster.router.config import RouterConfig
    from pdcluster.router.metrics import RouterMetrics
    from pdcluster.router.registry import WorkerRegistry
    from pdcluster.router.telemetry import Telemetry

    class Client:
        worker_id = "d0"

    ix = idx()
    reg = WorkerRegistry(RouterConfig(), RouterMetrics(CollectorRegistry()), ix, Telemetry())
    reg.add("decode", Client())
    log = BlockEventLog()
    log.record("stored", [10, 11])
    log.record("stored", [11, 12], tier="host")
    log.record("removed", [11])                      # evicted from device after its write-behind
    log.record("stored", [13], tier="disk")
    st = WorkerStatus.of("d0", "decode", "inc", 1, {"num_blocks": 8, "host_load_bytes": 4096, "host_load_s": 0.001},
                         log.drain())
    st = WorkerStatus.from_bytes(st.to_bytes())
    assert [e.tier for e in st.block_events] == ["device", "host", "device", "disk"]
    reg._ingest(reg.loads["d0"], st, now=0.0)
    assert ix.match_tiers([10, 11, 12, 13, 14]) == {"d0": (1, 2, 1)} and ix.is_exact("d0", now=0.0)
    assert reg.telemetry.tier_load_bps(reg.loads["d0"], "host") == pytest.approx(4096 / 0.001)
    assert EngineFigures().host_load_bytes == 0      # figures of a worker without tiers: defaults


def test_match_tiers_equals_a_per_worker_walk_on_random_indexes():
    import random

    def walk(tiers, hashes):
        """One worker's hit, walked alone: its device prefix, then host-or-disk blocks."""
        dev, host, disk = tiers
        d = next((i for i, h in enumerate(hashes) if h not in dev), len(hashes))
        i, nh = d, 0
        while i < len(hashes) and (hashes[i] in host or hashes[i] in disk):
            nh += hashes[i] in host
            i += 1
        return (d, nh, i - d - nh)

    rng = random.Random(0)
    lower_seen = 0
    for _ in range(200):
        ix, truth = idx(), {}
        for w in ("a", "b", "c", "d"):
            held = [set(h for h in range(12) if rng.random() < p) for p in (0.6, 0.4, 0.3)]
            truth[w] = held
            for tier, hs in zip(("device", "host", "disk"), held):
                ix.apply(w, "stored", sorted(hs), now=0, tier=tier)
        prompt = rng.sample(range(12), rng.randint(0, 12))
        got = ix.match_tiers(prompt)
        assert got == {w: walk(t, prompt) for w, t in truth.items()}, prompt
        assert {w: h.device for w, h in got.items()} == ix.match(prompt)
        lower_seen += sum(h.host + h.disk for h in got.values())
    assert lower_seen > 100                 # the lower tiers were exercised, not only device prefixes


def test_registry_resyncs_a_gap_from_a_tiered_snapshot():
    """WorkerRegistry.refresh: a status poll whose block_seq shows lost events triggers a resync from
    the worker's snapshot, by tier (CacheSnapshot) or device-only (the (seq, hashes) pair)."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from pdcluster.messages import CacheSnapshot, EngineFigures, WorkerStatus
    from pdcluster.router.config import RouterConfig, Timeouts
    from pdcluster.router.metrics import RouterMetrics
    from pdcluster.router.registry import WorkerRegistry
    from pdcluster.router.telemetry import Telemetry

    class Worker:
        """The registry's view of a worker (router/workers.py's client methods it calls, its timeouts)."""
        t = Timeouts()

        def __init__(self, worker_id, snapshot):
            self.worker_id, self.snapshot = worker_id, snapshot

        async def status(self, drain_events=True):
            return WorkerStatus(self.worker_id, "decode", "inc", 1, EngineFigures(num_blocks=8), block_seq=5)

        async def cached_hashes(self):
            return self.snapshot

    ix = idx()
    reg = WorkerRegistry(RouterConfig(), RouterMetrics(CollectorRegistry()), ix, Telemetry())
    reg.add("decode", Worker("d0", CacheSnapshot(5, [1], host=[2], disk=[3])))
    reg.add("decode", Worker("d1", (5, [1, 2])))
    asyncio.run(reg.refresh())
    assert ix.match_tiers([1, 2, 3, 4]) == {"d0": (1, 1, 1), "d1": (2, 0, 0)}
    assert ix.needs_resync() == [] and ix.is_exact("d0")


def test_match_levels_and_inexact_follow_every_change():
    """match_levels (memoized walk) == match, and inexact == the workers whose confidence is below 1,
    after each of a random run of events, expects, removals, resyncs, gaps, expiries and clock steps
    (the clock sometimes goes back). Control: the walk memo does get reused (steps survive queries)."""
    import random
    rng = random.Random(5)
    ix = idx(expect_ttl_s=20.0)
    chains = [[c * 1000 + i for i in range(12)] for c in range(3)] + [[1000 + i for i in range(6)] + [7000, 7001]]
    workers = [f"w{i}" for i in range(8)]
    t, reused = 0.0, 0
    for step in range(1500):
        w, ch = rng.choice(workers), rng.choice(chains)
        k = rng.randrange(9)
        if k < 3:
            a = rng.randint(0, len(ch) - 1)
            ix.apply(w, "stored" if k < 2 else "removed", ch[a:a + rng.randint(1, 6)], now=t)
        elif k == 3:
            ix.expect(w, ch[: rng.randint(1, len(ch))], now=t)
        elif k == 4:
            ix.heartbeat(w, seq=rng.choice([None, 10_000 + step]), now=t)
        elif k == 5 and rng.random() < 0.3:
            ix.remove_worker(w) if rng.random() < 0.5 else ix.resync(w, ch[: rng.randint(0, len(ch))], seq=0, now=t)
        elif k == 6:
            ix.expire(t)
        else:
            t += rng.choice([0.5, 3.0, 8.0, 60.0, 200.0, -4.0])
        q = rng.choice(chains)[: rng.randint(1, 12)]
        before = len(ix._steps)
        levels = ix.match_levels(q)
        reused += before > 0 and len(ix._steps) == before
        got = {w: n for n, ws in levels for w in ws}
        assert got == {w: n for w, n in ix.match(q).items() if n}, step
        assert sorted(n for n, _ in levels) == sorted({n for n, _ in levels})      # one level per length
        assert ix.inexact(t) == {w: c for w in ix.workers if (c := ix.confidence(w, t)) != 1.0}, step
        some = rng.sample(workers, 4) + ["unknown"]
        assert ix.match_weighted(q, some, t) == {w: n * ix.confidence(w, t) if n else 0.0
                                                 for w, n in ix.match(q, some).items()}, step
    assert reused > 100
