"""CostModel.choose (numpy columns kept across decisions, cost_vector.py) and choose_scan (grouped,
one pass) against choose_exhaustive (every (p, d) pair priced, the reference) on seeded random
fleets: zones, zone-pair priors, measured links, unhealthy, draining and full workers, prefix hits
with stale confidence, hits in host / disk tiers (priced by their load), codecs, SLO guards, exact
ties; and one CostModel kept over a run of decisions interleaved with load, status, membership,
index and link changes, so that a cache that misses a change fails. Each test runs twice: choose
priced by the numba kernel (cost_kernel.py) and by numpy alone (where numba is missing)."""
import copy
import random
import sys
from dataclasses import replace

import pytest

from pdcluster.messages import EngineFigures, LinkFigures, WorkerStatus
from pdcluster.router.cost_config import CostConfig
from pdcluster.router.placement import WorkerLoad
from pdcluster.router.placement.cost_model import CostModel
from pdcluster.router.placement import cost_vector
from pdcluster.router.placement.cost_vector import SCAN
from pdcluster.router.prefix_index import PrefixIndex

pytestmark = pytest.mark.timeout(60)

BS = 16


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def pricing(request, monkeypatch):
    """choose's pricing: the numba kernel (a declared dependency: its absence fails here) or numpy."""
    monkeypatch.setattr(cost_vector, "COMPILED", request.param == "compiled")
    assert (cost_vector.compiled_kernel() is not None) == (request.param == "compiled")
    return request.param


def fleet(rng: random.Random, ties: bool):
    zones = ["a", "b", "c"][: rng.randint(1, 3)]
    n_p, n_d = rng.randint(0, 7), rng.randint(1, 7)
    proto_p = dict(queued_tokens=rng.choice([0, 4096]), prefill_tps=rng.choice([5e3, 2e4]))
    proto_d = dict(running=rng.randint(0, 8), prefill_tps=4e3, decode_step_s=(0.02, 0.002),
                   num_blocks=2000, free_blocks=2000)

    def p(i):
        kw = dict(proto_p) if ties else dict(queued_tokens=rng.choice([0, 0, 512, 4096, 10_000]),
                                             waiting_tokens=rng.choice([0, 0, 2048]),
                                             prefill_tps=rng.choice([None, 5e3, 2e4, 8e3]))
        return WorkerLoad(f"p{i}", "prefill", zone=rng.choice(zones), healthy=rng.random() > 0.1,
                          draining=rng.random() < 0.05, in_flight=rng.randint(0, 3), **kw)

    def d(i):
        kw = dict(proto_d) if ties else dict(
            running=rng.randint(0, 40), in_flight=rng.randint(0, 10), prefill_tps=rng.choice([None, 3e3, 1e4]),
            decode_step_s=rng.choice([None, (0.02, 0.002), (0.01, 0.01)]),
            num_blocks=rng.choice([1, 300, 2000]), free_blocks=rng.choice([0, 5, 150, 2000]),
            free_cached_blocks=rng.choice([0, 0, 5, 150]),
            waiting_tokens=rng.choice([0, 300]), queued_tokens=rng.choice([0, 0, 900]))
        return WorkerLoad(f"d{i}", "decode", zone=rng.choice(zones), healthy=rng.random() > 0.1,
                          draining=rng.random() < 0.05, **kw)

    return zones, [p(i) for i in range(n_p)], [d(i) for i in range(n_d)]


def config(rng: random.Random, zones):
    pairs = tuple((za, zb, rng.choice([1e8, 5e9])) for za in zones for zb in zones if rng.random() < 0.3)
    return CostConfig(block_size=BS, kv_bytes_per_token=rng.choice([46_080, 131_072]),
                      kv_compression=rng.choice(["off", "int8", "auto"]), zone_pair_bps=pairs,
                      tpot_slo_s=rng.choice([None, 0.25, 0.05, 0.03]), tpot_strict=rng.random() < 0.2,
                      allow_local=rng.random() < 0.85, local_max_tokens=rng.choice([None, None, 1000]),
                      duplicate_penalty=rng.choice([0.0, 1.0, 3.0]), local_penalty=rng.choice([0.0, 0.5]),
                      cross_zone_bps=rng.choice([1.25e8, 1e7]), num_layers=rng.choice([1, 30]),
                      prior_host_load_bps=rng.choice([2e9, 2e7]), prior_disk_load_bps=rng.choice([5e8, 5e6]))


def case(seed: int, ties: bool, tiers: bool = True):
    rng = random.Random(seed)
    zones, ps, ds = fleet(rng, ties)
    cm = CostModel(config(rng, zones), PrefixIndex(silent_after_s=5.0, tau_s=30.0, horizon_s=300.0))
    prefix = list(range(1000 + seed * 100, 1000 + seed * 100 + 40))
    for w in ps + ds:                               # prefix hits of several lengths, some stale
        if rng.random() < 0.6:
            n = 0 if ties else rng.randint(1, 40)
            cm.index.apply(w.worker_id, "stored", prefix[:n if n else 8], seq=1, now=0.0)
            if tiers and not ties and rng.random() < 0.5:     # more of the prefix in its host / disk tier
                k = n + rng.randint(1, 20)
                cm.index.apply(w.worker_id, "stored", prefix[n:k], seq=2, now=0.0, tier=rng.choice(["host", "disk"]))
            cm.index.heartbeat(w.worker_id, seq=rng.choice([1, 2, 3]), now=0.0)
    links = [LinkFigures(p.worker_id, d.worker_id, count=1, ewma_bytes_per_s=rng.choice([1e7, 1e9, 1e10]),
                         last_sample_time=0.0) for p in ps for d in ds if rng.random() < 0.2]
    cm.telemetry.links.ingest(links, {w.worker_id: w.zone for w in ps + ds})
    prompt_len = rng.choice([16, 100, 640, 4000, 20_000])
    hashes = prefix[: max(1, prompt_len // BS)] if rng.random() < 0.8 else None
    exclude = frozenset(w.worker_id for w in ps + ds if rng.random() < 0.1)
    now = rng.choice([1.0, 20.0, 400.0])
    return cm, prompt_len, ps, ds, exclude, hashes, now


@pytest.mark.parametrize("ties,tiers", [(False, True), (True, True), (False, False)])
def test_choose_equals_exhaustive_on_random_fleets(ties, tiers):
    kinds, vector = set(), 0
    for seed in range(600 if tiers else 300):
        cm, n, ps, ds, ex, hs, now = case(seed, ties, tiers)
        fast = cm.choose(n, ps, ds, ex, hashes=hs, now=now)
        scan = cm.choose_scan(n, ps, ds, ex, hashes=hs, now=now)
        ref = cm.choose_exhaustive(n, ps, ds, ex, hashes=hs, now=now)
        assert fast == ref, f"seed {seed}"          # the Placement and its whole estimate
        assert scan == ref, f"seed {seed}"
        vector += cm._vector.choose(n, ps, ds, ex, hs, now) is not SCAN
        kinds.add(None if ref is None else ref.kind)
        if ref is not None and ref.estimate["tier_load_s"] > 0:
            kinds.add("tier-load")
    assert kinds >= {None, "local", "remote"}       # every branch was exercised
    assert ties or not tiers or "tier-load" in kinds    # and choices that pay a tier load
    assert vector >= (250 if not tiers or ties else 50)     # most cases took the numpy columns


def test_choose_equals_exhaustive_on_larger_fleets():
    """10-30 workers a side over up to 4 zones (the columns price only candidate prefill rows: here
    most rows are outside the bound), the same WorkerLoad in both lists sometimes, figures changed
    between decisions."""
    vector = 0
    for seed in range(60):
        rng = random.Random(50_000 + seed)
        zones = ["a", "b", "c", "d"][: rng.randint(1, 4)]
        ps = [WorkerLoad(f"p{i:02d}", "prefill", zone=rng.choice(zones), healthy=rng.random() > 0.1,
                         queued_tokens=rng.choice([0, 512, rng.randint(0, 9000)]), waiting_tokens=rng.choice([0, 2048]),
                         prefill_tps=rng.choice([None, 5e3, rng.uniform(1e3, 3e4)]))
              for i in rng.sample(range(99), rng.randint(10, 30))]
        ds = [WorkerLoad(f"d{i:02d}", "decode", zone=rng.choice(zones), running=rng.randint(0, 40),
                         in_flight=rng.randint(0, 10), prefill_tps=rng.choice([None, 3e3, 1e4]),
                         decode_step_s=rng.choice([None, (0.02, 0.002), (0.01, 0.01)]), num_blocks=2000,
                         free_blocks=rng.choice([5, 150, 2000]), free_cached_blocks=rng.choice([0, 5, 150]),
                         queued_tokens=rng.choice([0, 900]))
              for i in rng.sample(range(99), rng.randint(10, 30))]
        if rng.random() < 0.3:
            ps.append(ds[0])
        cm = CostModel(config(rng, zones), PrefixIndex(silent_after_s=5.0, tau_s=30.0, horizon_s=300.0))
        prefix = list(range(1000 + seed * 100, 1000 + seed * 100 + 40))
        for w in ps + ds:
            if rng.random() < 0.6:
                cm.index.apply(w.worker_id, "stored", prefix[:rng.randint(1, 40)], seq=1, now=0.0)
                cm.index.heartbeat(w.worker_id, seq=rng.choice([1, 2]), now=0.0)
        cm.telemetry.links.ingest([LinkFigures(p.worker_id, d.worker_id, count=1, ewma_bytes_per_s=1e9,
                                               last_sample_time=0.0) for p in ps for d in ds if rng.random() < 0.03],
                                  {w.worker_id: w.zone for w in ps + ds})
        n = rng.choice([100, 640, 4000])
        hs = prefix[: n // BS] if rng.random() < 0.8 else None
        ex = frozenset(w.worker_id for w in ps + ds if rng.random() < 0.05)
        for _ in range(2):
            assert cm.choose(n, ps, ds, ex, hashes=hs, now=20.0) == cm.choose_exhaustive(n, ps, ds, ex, hashes=hs,
                                                                                          now=20.0), f"seed {seed}"
            vector += cm._vector.choose(n, ps, ds, ex, hs, 20.0) is not SCAN
            w = rng.choice(ps + ds)
            w.in_flight, w.queued_tokens = w.in_flight + 1, w.queued_tokens + 700
    assert vector >= 100


def test_without_numba_choose_prices_with_numpy(monkeypatch):
    """Where numba does not import, choose still answers (numpy pricing); control: it imports here."""
    import pdcluster.router.placement as placement
    monkeypatch.setattr(cost_vector, "COMPILED", True)
    assert cost_vector.compiled_kernel() is not None
    monkeypatch.setitem(sys.modules, "numba", None)             # `import numba` raises ImportError
    monkeypatch.delitem(sys.modules, "pdcluster.router.placement.cost_kernel")
    monkeypatch.delattr(placement, "cost_kernel")
    assert cost_vector.compiled_kernel() is None
    for seed in range(40):
        cm, n, ps, ds, ex, hs, now = case(seed, False, tiers=False)
        assert cm.choose(n, ps, ds, ex, hashes=hs, now=now) == cm.choose_exhaustive(n, ps, ds, ex, hashes=hs, now=now)
        assert cm._vector.kernel is None


def test_warm_compiles_for_the_types_choose_passes(pricing):
    """CostModel.warm (the Router calls it at start) leaves nothing to compile at the placements:
    choose, with and without a measured link, adds no specialization of the kernel."""
    cm = CostModel(CostConfig(block_size=BS, tpot_slo_s=1, remote_overhead_s=0, duplicate_penalty=0))
    cm.warm()
    k = cm._vector.kernel
    if pricing == "numpy":
        assert k is None
        return
    made = (len(k.decide.signatures), len(k.pick_guarded.signatures))
    assert made[0] == 1
    ps = [WorkerLoad(f"p{i}", "prefill", prefill_tps=1e4, zone="a") for i in range(3)]
    ds = [WorkerLoad(f"d{i}", "decode", decode_step_s=(0.02, 0.0), zone="b", num_blocks=1000, free_blocks=1000)
          for i in range(3)]
    assert cm.choose(4096, ps, ds, now=0.0) == cm.choose_exhaustive(4096, ps, ds, now=0.0)
    cm.telemetry.links.ingest([LinkFigures("p0", "d0", count=1, ewma_bytes_per_s=1e6, last_sample_time=0.0)])
    assert cm.choose(4096, ps, ds, now=0.0) == cm.choose_exhaustive(4096, ps, ds, now=0.0)
    assert (len(k.decide.signatures), len(k.pick_guarded.signatures)) == (1, max(made[1], 1))


def test_no_decode_worker_or_none_usable_is_no_placement():
    ps = [WorkerLoad(f"p{i}", "prefill", prefill_tps=1e4, zone="a") for i in range(2)]
    d = WorkerLoad("d0", "decode", zone="b", num_blocks=1000, free_blocks=1000)
    cm = CostModel(CostConfig(block_size=BS))
    assert cm.choose(100, ps, [], now=0.0) is None is cm.choose(100, [], [], now=0.0)
    assert cm.choose(100, ps, [d], frozenset({"d0"}), now=0.0) is None
    assert cm.choose(100, ps, [d], now=0.0).decode == "d0"       # control


def test_ties_go_to_the_lowest_ids():
    ps = [WorkerLoad(f"p{i}", "prefill", prefill_tps=1e4, zone="a") for i in (3, 1, 2)]
    ds = [WorkerLoad(f"d{i}", "decode", prefill_tps=1e3, decode_step_s=(0.02, 0.0), zone="a",
                     num_blocks=1000, free_blocks=1000) for i in (2, 0, 1)]
    cm = CostModel(CostConfig(block_size=BS, allow_local=False))
    got = cm.choose(4096, ps, ds, now=0.0)
    assert (got.prefill, got.decode) == ("p1", "d0") == (cm.choose_exhaustive(4096, ps, ds, now=0.0).prefill, "d0")


def test_equal_costs_from_different_zones_go_to_the_lower_prefill_id():
    """Two prefill workers whose keys differ by rounding (in the window of near-lowest keys) and whose
    costs round to the same value: the lower id wins, although its zone comes later (the columns keep
    prefill rows in zone order)."""
    cfg = CostConfig(block_size=BS, allow_local=False, duplicate_penalty=0.0,
                     zone_pair_bps=(("x", "a", 1e12), ("y", "a", 1e12)))
    ps = [WorkerLoad("p2", "prefill", zone="x", prefill_tps=6000.0, queued_tokens=2420),
          WorkerLoad("p1", "prefill", zone="y", prefill_tps=2000.0, queued_tokens=140)]
    ds = [WorkerLoad("d0", "decode", zone="a", decode_step_s=(1.0, 0.0), num_blocks=1000, free_blocks=1000)]
    cm = CostModel(cfg)
    es = {e.prefill: e for e in cm.estimates(1000, ps, ds, now=0.0)}
    assert es["p1"].cost_s == es["p2"].cost_s                                     # a tie after rounding
    assert es["p1"].queue_s + es["p1"].compute_s != es["p2"].queue_s + es["p2"].compute_s   # of different keys
    got = cm.choose(1000, ps, ds, now=0.0)
    assert cm._vector.choose(1000, ps, ds, frozenset(), None, 0.0) is not SCAN
    assert got == cm.choose_exhaustive(1000, ps, ds, now=0.0) and got.prefill == "p1"


def test_a_measured_link_is_priced_for_its_pair_alone():
    """Control: a slow measured link from the otherwise cheapest p to d moves the choice."""
    ps = [WorkerLoad("p0", "prefill", prefill_tps=2e4, zone="a"),
          WorkerLoad("p1", "prefill", prefill_tps=1.9e4, zone="a")]
    ds = [WorkerLoad("d0", "decode", decode_step_s=(0.02, 0.0), zone="a", num_blocks=1000, free_blocks=1000)]
    cm = CostModel(CostConfig(block_size=BS, allow_local=False))
    assert cm.choose(8000, ps, ds, now=0.0).prefill == "p0"
    cm.telemetry.links.ingest([LinkFigures("p0", "d0", count=1, ewma_bytes_per_s=1e6, last_sample_time=0.0)])
    assert cm.choose(8000, ps, ds, now=0.0).prefill == "p1" == cm.choose_exhaustive(8000, ps, ds, now=0.0).prefill



def test_transfer_seconds_follow_the_prompt_length_under_one_hit_pattern():
    """One prompt prefix (the same index levels, so the same memoized groups) at several lengths:
    the cross-zone transfer grows with the length, so short prompts take the idle far prefill
    worker and long ones the busy near one. A transfer figure kept from another length fails."""
    cfg = CostConfig(block_size=BS, allow_local=False, num_layers=1, kv_bytes_per_token=131_072,
                     intra_zone_bps=1e12, cross_zone_bps=1e9)
    ps = [WorkerLoad("p0", "prefill", zone="a", prefill_tps=1e4, queued_tokens=500),
          WorkerLoad("p1", "prefill", zone="b", prefill_tps=1e4)]
    ds = [WorkerLoad("d0", "decode", zone="a", decode_step_s=(0.02, 0.0), num_blocks=1000, free_blocks=1000)]
    cm = CostModel(cfg, PrefixIndex())
    prefix = list(range(500, 520))
    cm.index.apply("d0", "stored", prefix[:4], seq=1, now=0.0)     # the same levels at every length
    got = []
    for n in (200, 1000, 200, 2000, 96, 1000):
        hs = prefix[: n // BS]
        c = cm.choose(n, ps, ds, hashes=hs, now=0.0)
        assert cm._vector.choose(n, ps, ds, frozenset(), hs, 0.0) is not SCAN
        assert c == cm.choose_exhaustive(n, ps, ds, hashes=hs, now=0.0)
        got.append(c.prefill)
    assert got == ["p1", "p0", "p1", "p0", "p1", "p0"]

# one CostModel over a run: its columns must follow every change between decisions

def _status(w: WorkerLoad, rng: random.Random, counters: dict) -> WorkerStatus:
    """A status poll of w with new step counters (its learned rate and step time move)."""
    f = counters.setdefault(w.worker_id, dict(prefill_tokens=0, prefill_s=0.0, decode_steps=0, decode_seqs=0,
                                              decode_s=0.0))
    f["prefill_tokens"] += rng.choice([500, 4000])
    f["prefill_s"] += rng.choice([0.05, 0.5, 2.0])
    f["decode_steps"] += 10
    f["decode_seqs"] += 10 * rng.randint(1, 30)
    f["decode_s"] += rng.choice([0.1, 0.5, 1.5])
    eng = EngineFigures(free_blocks=w.free_blocks, num_blocks=w.num_blocks, waiting_tokens=rng.choice([0, 700]), **f)
    return WorkerStatus(w.worker_id, w.role, "inc", 1, eng, running=rng.randint(0, 30))


def _mutate(rng: random.Random, cm: CostModel, ps: list, ds: list, prefix: list, t: float, counters: dict,
            made: list) -> tuple[list, list, float]:
    """One random change of the kinds the router makes between two placements."""
    k = rng.randrange(11)
    w = rng.choice(ps + ds)
    if k == 0:                                      # charge / discharge (router/lifecycle/place.py)
        sign = rng.choice([1, -1])
        w.in_flight = max(0, w.in_flight + sign)
        w.queued_tokens = max(0, w.queued_tokens + sign * rng.choice([100, 3000]))
    elif k == 1:                                    # a decode worker's KV pool and batch
        w.free_blocks, w.running = rng.choice([0, 5, 150, 2000]), rng.randint(0, 40)
    elif k == 2:                                    # missed / answered a poll, drained
        w.healthy, w.draining = rng.random() < 0.7, rng.random() < 0.1
    elif k == 3:                                    # learned figures (Telemetry touches the load)
        cm.telemetry.ingest_status(w, _status(w, rng, counters))
    elif k == 4:                                    # overrides and zone
        w.prefill_tps = rng.choice([None, 3e3, 2e4])
        w.decode_step_s = rng.choice([None, (0.02, 0.002), (0.01, 0.01)])
        w.zone = rng.choice(["a", "b"])
    elif k == 5:                                    # a worker joins (a new list, as loads_of gives)
        i = len(made)
        if rng.random() < 0.5:
            nw = WorkerLoad(f"p{i}x", "prefill", zone=rng.choice(["a", "b"]), prefill_tps=rng.choice([5e3, 2e4]))
            ps = ps + [nw]
        else:
            nw = WorkerLoad(f"d{i}x", "decode", zone=rng.choice(["a", "b"]), decode_step_s=(0.02, 0.002),
                            num_blocks=2000, free_blocks=2000, prefill_tps=4e3)
            ds = ds + [nw]
        made.append(nw)
        cm.index.add_worker(nw.worker_id, t)
    elif k == 6 and len(ds) > 1:                    # a worker leaves (registry.remove)
        gone = rng.choice(ps + ds)
        if gone in ps:
            ps = [x for x in ps if x is not gone]
        elif len(ds) > 1:
            ds = [x for x in ds if x is not gone]
        cm.index.remove_worker(gone.worker_id)
        cm.telemetry.remove_worker(gone.worker_id)
    elif k == 7:                                    # block events: the prefix grows or shrinks on w
        n = rng.randint(0, len(prefix))
        cm.index.apply(w.worker_id, rng.choice(["stored", "removed"]), prefix[n:n + rng.randint(1, 10)], now=t)
    elif k == 8:                                    # a placement's expect
        cm.index.expect(w.worker_id, prefix[: rng.randint(1, len(prefix))], t)
    elif k == 9:                                    # a sequence gap (approximate) or a resync
        if rng.random() < 0.5:
            cm.index.heartbeat(w.worker_id, seq=10_000 + rng.randint(0, 10), now=t)
        else:
            cm.index.resync(w.worker_id, prefix[: rng.randint(0, len(prefix))], seq=0, now=t)
    else:                                           # time passes (workers go silent) or a link is measured
        if rng.random() < 0.5:
            t += rng.choice([1.0, 7.0, 40.0])
            for x in rng.sample(ps + ds, k=max(1, len(ps + ds) // 2)):
                cm.index.heartbeat(x.worker_id, now=t)
        elif ps:
            p, d = rng.choice(ps), rng.choice(ds)
            cm.telemetry.links.ingest([LinkFigures(p.worker_id, d.worker_id, count=rng.randint(1, 99),
                                                   ewma_bytes_per_s=rng.choice([1e7, 1e10]), last_sample_time=t)],
                                      {x.worker_id: x.zone for x in ps + ds})
    return ps, ds, t


def _run(seed: int, steps: int, break_cache: bool = False) -> int:
    """Decisions interleaved with changes; returns how many differed from choose_exhaustive.
    break_cache: the control, a cache that never hears of a change (every watch removed)."""
    rng = random.Random(seed)
    zones = ["a", "b"]
    ps = [WorkerLoad(f"p{i}", "prefill", zone=rng.choice(zones), prefill_tps=rng.choice([None, 5e3, 2e4]),
                     queued_tokens=rng.choice([0, 512, 4096])) for i in range(rng.randint(1, 8))]
    ds = [WorkerLoad(f"d{i}", "decode", zone=rng.choice(zones), running=rng.randint(0, 30),
                     decode_step_s=rng.choice([None, (0.02, 0.002)]), prefill_tps=rng.choice([None, 4e3]),
                     num_blocks=2000, free_blocks=rng.choice([150, 2000])) for i in range(rng.randint(1, 8))]
    cfg = CostConfig(block_size=BS, tpot_slo_s=rng.choice([None, 0.1]), duplicate_penalty=rng.choice([0.0, 2.0]),
                     local_penalty=rng.choice([0.0, 0.5]), zone_pair_bps=(("a", "b", 1e8),),
                     kv_compression=rng.choice(["off", "auto"]))
    cm = CostModel(cfg, PrefixIndex(silent_after_s=5.0, tau_s=30.0, horizon_s=300.0))
    prefix = [10_000 * (seed + 1) + i for i in range(48)]
    t, counters, made, wrong = 0.0, {}, [], 0
    for w in ps + ds:
        cm.index.apply(w.worker_id, "stored", prefix[: rng.randint(0, 40)], now=t)
    for _ in range(steps):
        for _ in range(rng.randint(1, 3)):
            ps, ds, t = _mutate(rng, cm, ps, ds, prefix, t, counters, made)
        n = rng.choice([100, 640, 4000])
        hs = prefix[: n // BS] if rng.random() < 0.9 else None
        ex = frozenset(w.worker_id for w in ps + ds if rng.random() < 0.05)
        got = cm.choose(n, ps, ds, ex, hashes=hs, now=t)
        if break_cache and cm._vector is not None:
            cols = cm._vector.cols
            for w in cols.loads:
                w.unwatch(cols.dirty)
        wrong += got != cm.choose_exhaustive(n, ps, ds, ex, hashes=hs, now=t)
    return wrong


def test_choose_follows_changes_between_decisions():
    assert sum(_run(seed, 50) for seed in range(25)) == 0


def test_an_equal_copy_in_the_list_is_a_different_worker():
    """A WorkerLoad replaced in the list by an equal-valued copy is watched from then on: a learned
    figure of its worker that moves (Telemetry touches the copy) reaches the price."""
    ps = [WorkerLoad("p0", "prefill", prefill_tps=1e4, zone="a")]
    ds = [WorkerLoad(f"d{i}", "decode", prefill_tps=1e3, zone="a", num_blocks=1000, free_blocks=1000)
          for i in range(2)]
    cm = CostModel(CostConfig(block_size=BS, allow_local=False))
    assert cm.choose(4096, ps, ds, now=0.0).decode == "d0"
    ds = [copy.copy(ds[0]), ds[1]]
    assert cm.choose(4096, ps, ds, now=0.0).decode == "d0"
    for _ in range(20):                             # d0's steps turn slow: d1 joins sooner
        cm.telemetry.perf_of("d0", "decode").decode.observe(1, 5.0)
    ds[0].touch()
    assert cm.choose(4096, ps, ds, now=0.0).decode == "d1" == cm.choose_exhaustive(4096, ps, ds, now=0.0).decode


def test_a_cache_that_misses_changes_is_caught():
    """Control: the same runs with the columns never told of a change differ from the reference."""
    assert sum(_run(seed, 50, break_cache=True) for seed in range(10)) > 0


@pytest.mark.parametrize("peer_pull", [False, True])
def test_pull_serving_charges_keep_the_choosers_equal(peer_pull):
    """A peer pull's holder is charged its serving (router/lifecycle/pull.py charge: queued tokens and
    serving seconds) while the pull runs, between decisions: choose (its columns kept across them),
    choose_scan and choose_exhaustive still agree, with pulls priced (peer_pull, where a holder's
    serving backlog also delays later pulls from it) and without; and the charges changed decisions."""
    from pdcluster.router.lifecycle.pull import charge
    changed = 0
    for seed in range(200):
        cm, n, ps, ds, ex, hs, now = case(seed, False, tiers=seed % 2 == 0)
        cm.cfg = replace(cm.cfg, peer_pull=peer_pull)
        cm.telemetry.cfg = cm.cfg
        rng = random.Random(90_000 + seed)
        before = cm.choose_exhaustive(n, ps, ds, ex, hashes=hs, now=now)
        held = []
        for _ in range(3):
            w = rng.choice(ps + ds)
            c = (w, rng.choice([50, 400, 3000]), rng.choice([0.05, 0.5, 2.0]))
            charge(*c, +1)
            held.append(c)
            got = cm.choose(n, ps, ds, ex, hashes=hs, now=now)
            ref = cm.choose_exhaustive(n, ps, ds, ex, hashes=hs, now=now)
            assert got == ref == cm.choose_scan(n, ps, ds, ex, hashes=hs, now=now), f"seed {seed}"
        changed += ref != before
        for c in held:
            charge(*c, -1)
        assert cm.choose(n, ps, ds, ex, hashes=hs, now=now) == before, f"seed {seed}: charges taken off"
    assert changed >= 20
