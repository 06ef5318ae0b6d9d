"""router.placement: every policy by name, one interface; round-robin cycles; cache-aware hits."""
import pytest

from pdcluster.engine.hashing import block_hashes
from pdcluster.router.placement import DEFAULT_POLICY, POLICY_NAMES, Placement, WorkerLoad, make_policy
from pdcluster.router.placement.cache_aware import CacheAware
from pdcluster.router.placement.cost_model import CostModel
from pdcluster.router.placement.dynamo import DynamoKV
from pdcluster.router.placement.llmd import LlmD
from pdcluster.router.placement.least_loaded import LeastLoaded
from pdcluster.router.placement.round_robin import RoundRobin
from pdcluster.router.telemetry import Telemetry
from pdcluster.router.prefix_index import PrefixIndex

pytestmark = pytest.mark.timeout(60)


def pools():
    ps = [WorkerLoad(f"p{i}", "prefill") for i in range(2)]
    ds = [WorkerLoad(f"d{i}", "decode", free_blocks=100, num_blocks=100) for i in range(3)]
    return ps, ds


def test_make_policy_by_name():
    assert POLICY_NAMES == ("round-robin", "least-loaded", "cache-aware", "llm-d", "dynamo-kv", "cost-model")
    assert DEFAULT_POLICY == "cost-model" and isinstance(make_policy(), CostModel)
    ix = PrefixIndex()
    kw = dict(index=ix, local_prefill_max_tokens=0, remote_prefill=True)   # what the router passes to any
    types = {"round-robin": RoundRobin, "least-loaded": LeastLoaded, "cache-aware": CacheAware,
             "llm-d": LlmD, "dynamo-kv": DynamoKV, "cost-model": CostModel}
    ps, ds = pools()
    for name in POLICY_NAMES:
        pol = make_policy(name, **kw)
        assert isinstance(pol, types[name])
        # the positional call (router/lifecycle/place.py) and the extended keyword call both work
        d1 = pol.choose(64, ps, ds, set())
        d2 = pol.choose(64, ps, ds, set(), hashes=block_hashes(list(range(64)), 16), now=0.0)
        for dec in (d1, d2):
            assert isinstance(dec, Placement) and dec.decode in {"d0", "d1", "d2"}
            assert dec.kind in ("remote", "local") and (dec.prefill is None) == (dec.kind == "local")
        assert pol.choose(64, ps, ds, {"d0", "d1", "d2"}) is None
    assert make_policy("cache-aware", index=ix).index is ix
    t = Telemetry()
    cm = make_policy("cost-model", index=ix, telemetry=t, tpot_slo_s=0.05, remote_prefill=False)
    assert cm.index is ix and cm.telemetry is t and cm.cfg.tpot_slo_s == 0.05 and not cm.cfg.allow_remote
    with pytest.raises(ValueError, match="round-robin"):
        make_policy("random")
    with pytest.raises(TypeError):
        make_policy("least-loaded", bogus=1)


def test_round_robin_cycles():
    rr = make_policy("round-robin")
    ps, ds = pools()
    got = [rr.choose(10, ps, ds) for _ in range(6)]
    assert [g.decode for g in got] == ["d0", "d1", "d2", "d0", "d1", "d2"]
    assert [g.prefill for g in got] == ["p0", "p1", "p0", "p1", "p0", "p1"]
    nxt = rr.choose(10, ps, ds, {"d1"})                 # skips excluded / unhealthy workers
    assert nxt.decode in {"d0", "d2"}
    ds[0].healthy = False
    assert {rr.choose(10, ps, ds).decode for _ in range(4)} == {"d1", "d2"}
    local = make_policy("round-robin", local_prefill_max_tokens=32).choose(32, ps, ds)
    assert local.kind == "local" and local.prefill is None
    assert make_policy("round-robin").choose(10, [], ds).kind == "local"


def test_least_loaded_unchanged():
    ps, ds = pools()
    ps[0].queued_tokens = 500
    ds[0].in_flight, ds[2].free_blocks = 3, 50
    dec = make_policy("least-loaded").choose(100, ps, ds)
    assert (dec.prefill, dec.decode, dec.kind) == ("p1", "d1", "remote")
    assert LeastLoaded(local_prefill_max_tokens=100).choose(100, ps, ds).kind == "local"


def test_cache_aware_longest_prefix_then_load():
    ix = PrefixIndex()
    hs = block_hashes(list(range(160)), 16, "tenant")   # 10 blocks
    ix.apply("p1", "stored", hs[:6], now=0.0)
    ix.apply("p0", "stored", hs[:2], now=0.0)
    ix.apply("d2", "stored", hs[:3], now=0.0)
    pol = make_policy("cache-aware", index=ix)
    ps, ds = pools()
    ps[1].queued_tokens = 10_000                        # the hit beats the load
    dec = pol.choose(160, ps, ds, hashes=hs, now=0.0)
    assert (dec.prefill, dec.decode, dec.kind) == ("p1", "d2", "remote")
    assert dec.estimate == {"hit_blocks_decode": 3.0, "hit_blocks_prefill": 6.0}
    # no hits (other tenant): ties by load
    other = block_hashes(list(range(160)), 16, "someone-else")
    ds[0].in_flight = 2
    dec = pol.choose(160, ps, ds, hashes=other, now=0.0)
    assert (dec.prefill, dec.decode) == ("p0", "d1")
    # without hashes it is least-loaded
    assert pol.choose(160, ps, ds).prefill == "p0"
