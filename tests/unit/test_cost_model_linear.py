"""CostModel.choose (grouped, linear in workers) against choose_exhaustive (every (p, d) pair priced,
the reference) on seeded random fleets: zones, zone-pair priors, measured links, unhealthy,
draining and full workers, prefix hits with stale confidence, hits in host / disk tiers (priced by
their load), codecs, SLO guards, exact ties."""
import random
from dataclasses import replace

import pytest

from pdcluster.messages import LinkFigures
from pdcluster.router.cost_config import CostConfig
from pdcluster.router.placement import WorkerLoad
from pdcluster.router.placement.cost_model import CostModel
from pdcluster.router.prefix_index import PrefixIndex

pytestmark = pytest.mark.timeout(60)

BS = 16


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


def case(seed: int, ties: bool):
    rng = random.Random(seed)
    zones, ps, ds = fleet(rng, ties)
    cm = CostModel(config(rng, zones), PrefixIndex(silent_after_s=5.0, tau_s=30.0, horizon_s=300.0))
    prefix = list(range(1000 + seed * 100, 1000 + seed * 100 + 40))
    for w in ps + ds:                               # prefix hits of several lengths, some stale
        if rng.random() < 0.6:
            n = 0 if ties else rng.randint(1, 40)
            cm.index.apply(w.worker_id, "stored", prefix[:n if n else 8], seq=1, now=0.0)
            if not ties and rng.random() < 0.5:     # more of the prefix in its host / disk tier
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


@pytest.mark.parametrize("ties", [False, True])
def test_choose_equals_exhaustive_on_random_fleets(ties):
    kinds = set()
    for seed in range(600):
        cm, n, ps, ds, ex, hs, now = case(seed, ties)
        fast = cm.choose(n, ps, ds, ex, hashes=hs, now=now)
        ref = cm.choose_exhaustive(n, ps, ds, ex, hashes=hs, now=now)
        assert fast == ref, f"seed {seed}"          # the Placement and its whole estimate
        kinds.add(None if ref is None else ref.kind)
        if ref is not None and ref.estimate["tier_load_s"] > 0:
            kinds.add("tier-load")
    assert kinds >= {None, "local", "remote"}       # every branch was exercised
    assert ties or "tier-load" in kinds             # and choices that pay a tier load


def test_ties_go_to_the_lowest_ids():
    ps = [WorkerLoad(f"p{i}", "prefill", prefill_tps=1e4, zone="a") for i in (3, 1, 2)]
    ds = [WorkerLoad(f"d{i}", "decode", prefill_tps=1e3, decode_step_s=(0.02, 0.0), zone="a",
                     num_blocks=1000, free_blocks=1000) for i in (2, 0, 1)]
    cm = CostModel(CostConfig(block_size=BS, allow_local=False))
    got = cm.choose(4096, ps, ds, now=0.0)
    assert (got.prefill, got.decode) == ("p1", "d0") == (cm.choose_exhaustive(4096, ps, ds, now=0.0).prefill, "d0")


def test_a_measured_link_is_priced_for_its_pair_alone():
    """Control: a slow measured link from the otherwise cheapest p to d moves the choice."""
    ps = [WorkerLoad("p0", "prefill", prefill_tps=2e4, zone="a"),
          WorkerLoad("p1", "prefill", prefill_tps=1.9e4, zone="a")]
    ds = [WorkerLoad("d0", "decode", decode_step_s=(0.02, 0.0), zone="a", num_blocks=1000, free_blocks=1000)]
    cm = CostModel(CostConfig(block_size=BS, allow_local=False))
    assert cm.choose(8000, ps, ds, now=0.0).prefill == "p0"
    cm.telemetry.links.ingest([LinkFigures("p0", "d0", count=1, ewma_bytes_per_s=1e6, last_sample_time=0.0)])
    assert cm.choose(8000, ps, ds, now=0.0).prefill == "p1" == cm.choose_exhaustive(8000, ps, ds, now=0.0).prefill
