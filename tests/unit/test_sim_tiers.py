"""sim/tiers.py: an instance's host / disk KV tiers under its device prefix cache, their load costs,
and the tier-tagged block events the router's own prefix index, telemetry and cost model read.
Pure Python, fast."""
import pytest

from pdcluster.sim.cache import PrefixCache
from pdcluster.sim.cluster import PoolSpec, SimConfig, Simulator
from pdcluster.sim.tiers import TierStack
from pdcluster.sim.trace import Request, chain

pytestmark = pytest.mark.timeout(60)

A, B = chain(range(8)), chain(range(100, 108))          # two 8-block prompts, no shared block
BS = 512


def stack(host: int, disk: int = 0):
    c = PrefixCache(2)
    t = TierStack({"host": host, "disk": disk}, {"host": 10.0, "disk": 1.0}, 5, c._log)
    c.on_evict = t.evicted
    return c, t


def test_evicted_blocks_are_written_down_lru_and_logged_with_their_tier_in_one_sequence():
    c, t = stack(host=3, disk=5)
    c.insert([1, 2])
    c.insert([3, 4])                            # device holds 2: 1, 2 go down to host and disk
    assert 1 in t.tiers[0] and 1 in t.tiers[1] and 1 not in c
    c.insert([5, 6])                            # 3, 4 go down: the host's LRU (1) leaves host only
    assert [len(x) for x in t.tiers] == [3, 4] and 1 not in t.tiers[0] and 1 in t.tiers[1]
    # the walk stops at the first block no tier holds; each block is served by the fastest holder
    assert t.lookup([1, 2, 3, 9], 0, 4) == {"host": 2, "disk": 1}
    assert t.lookup([2, 3], 0, 2, ("host",)) == {"host": 2, "disk": 0}
    assert t.lookup([1, 2], 0, 2, ("host",)) == {"host": 0, "disk": 0}     # 1 is on disk only
    assert t.load_s({"host": 2, "disk": 1}) == {"host": 2 * 5 / 10.0, "disk": 5 / 1.0}
    seq, ev = c.drain()
    assert [e[0] for e in ev] == list(range(1, seq + 1))                    # one numbering
    assert [(e[1], e[3] if len(e) == 4 else "device", e[2]) for e in ev] == [
        ("stored", "device", [1, 2]), ("stored", "device", [3, 4]), ("removed", "device", [1, 2]),
        ("stored", "host", [1, 2]), ("stored", "disk", [1, 2]),
        ("stored", "device", [5, 6]), ("removed", "device", [3, 4]),
        ("stored", "host", [3, 4]), ("removed", "host", [1]), ("stored", "disk", [3, 4])]


def test_a_block_the_tier_already_holds_is_only_touched_and_zero_capacity_tiers_are_left_out():
    c, t = stack(host=2)
    assert [x.name for x in t.tiers] == ["host"]
    t.evicted([1, 2])
    t.evicted([1])                              # held: 1 is now the most recent, nothing logged
    t.evicted([3])                              # so 2 is the one evicted
    assert 1 in t.tiers[0] and 2 not in t.tiers[0]
    assert [(e[1], e[2]) for e in c.drain()[1]] == [("stored", [1, 2]), ("stored", [3]), ("removed", [2])]
    with pytest.raises(ValueError, match="load bandwidth"):
        TierStack({"host": 1}, {"host": 0.0}, 5, c._log)


def cfg(policy="round-robin", host_gb=64.0):
    return SimConfig("llama-3-8b", prefill=PoolSpec("H200", 1, host_cache_gb=host_gb), decode=PoolSpec("H20", 1),
                     policy=policy)


class Spy:
    """The real policy; records the router's index view of each prompt at its placement."""
    def __init__(self, sim):
        self.sim, self.inner, self.seen = sim, sim.policy, []

    def choose(self, prompt_len, prefills, decodes, exclude=frozenset(), *, hashes=None, now=None):
        out = self.inner.choose(prompt_len, prefills, decodes, exclude, hashes=hashes, now=now)
        self.seen.append((self.sim.index.match_tiers(hashes or []).get("prefill-0"), out))
        return out


def run_three(c, device_blocks=9):
    """A, then B (evicts A from a prefill pool of 9 blocks: one 9-block prompt at a time), then A again:
    (sim, result, spy)."""
    reqs = [Request(i, 10.0 * i, 8 * BS + 100, 3, h) for i, h in enumerate((A, B, A))]
    sim = Simulator(c, reqs)
    p = sim.inst["prefill-0"]
    p.num_blocks = device_blocks
    p.cache.resize(device_blocks)
    spy = sim.policy = Spy(sim)
    return sim, sim.run(), spy


def test_a_block_evicted_from_device_is_hit_in_the_host_tier_and_costs_its_load_time():
    sim, res, spy = run_three(cfg())
    p = sim.inst["prefill-0"]
    block_bytes = BS * p.roof.kv_bytes_per_token
    load = 8 * block_bytes / p.roof.hw.host_load_bps           # 8 blocks at the H200's host->device rate
    rec = res.records[2]
    assert rec.cached == 8 * BS
    assert p.f["host_load_bytes"] == 8 * block_bytes and p.f["host_load_s"] == pytest.approx(load)
    # TTFT by hand: one step of the 100-token tail after 4096 cached tokens, plus the load; the decode
    # instance holds A on device (its cache is big), so only the tail's KV crosses the link
    roof, link = p.roof, p.nic
    dt = roof.prefill_s([(100, 8 * BS)]) + load
    t = 100 * roof.kv_bytes_per_token / link.bps
    assert rec.ttft_s == pytest.approx(max(t, dt + t / roof.model.layers) + sim.cfg.topology.intra_zone_latency_s)
    # control: no tiers, A is recomputed, slower
    _, off, _ = run_three(cfg(host_gb=0.0))
    assert off.records[2].cached == 0 and off.records[2].ttft_s > rec.ttft_s + 0.05


def test_the_router_sees_tier_tagged_events_learns_the_load_rate_and_the_cost_model_prices_it():
    sim, res, spy = run_three(cfg("cost-model"))
    hits, choice = spy.seen[2]
    assert (hits.device, hits.host, hits.disk) == (0, 8, 0)       # the router's own index, from the polls' events
    assert sim.index.tiers_of("prefill-0", A[0]) >= {"host"}
    assert sim.index.num_blocks("prefill-0", "host") >= 8
    p = sim.inst["prefill-0"]
    bps = p.roof.hw.host_load_bps
    est = choice.estimate
    assert est["tier_load_s"] == pytest.approx(8 * BS * p.roof.kv_bytes_per_token / bps)
    # after the polls the router's telemetry holds the measured host rate (here equal to the prior, so
    # check it took a sample)
    sim._poll(sim.now)
    assert sim.telemetry.perf_of("prefill-0").tier_load["host"].rate == pytest.approx(bps)
    assert res.records[2].cached == 8 * BS


def slow_prior(policy):
    c = cfg(policy)
    return SimConfig(c.model, prefill=c.prefill, decode=c.decode, policy=policy,
                     cost_overrides=(("prior_host_load_bps", 1e9),))


def test_the_telemetry_learns_a_rate_that_differs_from_the_prior():
    sim, res, _ = run_three(slow_prior("round-robin"))
    assert res.records[2].kind == "remote" and res.records[2].cached == 8 * BS
    sim._poll(sim.now)
    r = sim.telemetry.perf_of("prefill-0").tier_load["host"]
    assert r.count == 1 and r.rate == pytest.approx(sim.inst["prefill-0"].roof.hw.host_load_bps)   # not the 1 GB/s prior


def test_the_cost_model_weighs_the_load_against_a_device_hit_elsewhere():
    """The decode instance holds A on device; prefill-0 only in its host tier. Priced at the default
    prior (50 GB/s: 11 ms) the H200 wins; priced at 1 GB/s (0.54 s) A's tail prefills locally on the H20."""
    fast = run_three(cfg("cost-model"))[1].records[2]
    slow = run_three(slow_prior("cost-model"))[1].records[2]
    assert (fast.kind, fast.cached) == ("remote", 8 * BS)
    assert (slow.kind, slow.cached) == ("local", 8 * BS)


def test_a_remote_prefill_skips_sending_what_the_decode_host_tier_holds_and_waits_for_its_load():
    """decode-0 (12 blocks) evicts A to its host tier while B runs; A again: its KV crosses the link only
    for the 100-token tail, and the first token waits for the 8 blocks' load instead."""
    def third(gb):
        c = SimConfig("llama-3-8b", prefill=PoolSpec("H200", 1), decode=PoolSpec("H20", 1, host_cache_gb=gb),
                      policy="round-robin")
        sim = Simulator(c, [Request(i, 10.0 * i, 8 * BS + 100, 3, h) for i, h in enumerate((A, B, A))])
        d = sim.inst["decode-0"]
        d.num_blocks = 12
        return sim.run().records[2], d
    rec, d = third(64.0)
    kv = d.roof.kv_bytes_per_token
    load = 8 * BS * kv / d.roof.hw.host_load_bps
    assert d.f["host_load_bytes"] == 8 * BS * kv and rec.kv_bytes == 100 * kv
    assert rec.ttft_s == pytest.approx(load)           # the load outlasts the prefill and the tail's transfer
    off, _ = third(0.0)
    assert off.kv_bytes == (8 * BS + 100) * kv          # control: without the tier all of A is sent


def test_tiers_that_are_never_hit_change_nothing():
    """Control: with a device cache big enough that nothing is evicted, tiers on == tiers off, exactly."""
    def recs(gb):
        _, res, _ = run_three(cfg(host_gb=gb), device_blocks=100)
        return [(r.prefill, r.decode, r.first_s, r.finish_s, r.cached) for r in res.records]
    assert recs(64.0) == recs(0.0)


def test_bad_tier_sizes_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="host_cache_gb"):
        Simulator(cfg(host_gb=-1.0), [])
