"""router.placement.cost_model over simulated worker states: online estimators, link pricing, crafted choices,
and the local/remote threshold sweep (conditional disaggregation)."""
from dataclasses import fields, replace

import pytest

from pdcluster.engine.hashing import block_hashes
from pdcluster.kv_transfer.meter import BandwidthMeter
from pdcluster.messages import EngineFigures, LinkFigures, WorkerStatus
from pdcluster.router.cost_config import CostConfig
from pdcluster.router.placement import WorkerLoad
from pdcluster.router.placement.cost_model import CostModel, Estimate
from pdcluster.router.telemetry import RateEstimator, StepTimeModel, Telemetry
from pdcluster.router.prefix_index import PrefixIndex

pytestmark = pytest.mark.timeout(60)

BS = 16
KVB = 46_080                     # bytes per token (SmolLM2-135M, fp32)


def status(role="prefill", links=(), running=0, **figures) -> WorkerStatus:
    """A worker's status poll with these engine figures (the rest 0)."""
    return WorkerStatus("w", role, "inc", 1, EngineFigures(**figures), running=running, links=links)


def links_of(meter: BandwidthMeter) -> tuple:
    return tuple(LinkFigures.of(s) for s in meter.snapshot())


def cfg(**kw):
    base = dict(block_size=BS, kv_bytes_per_token=KVB, num_layers=30, remote_overhead_s=0.005,
                local_penalty=0.5, local_chunk_tokens=512, tpot_slo_s=0.25)
    return CostConfig(**(base | kw))


def P(wid, tps=10_000.0, queued=0, zone="z1", **kw):
    return WorkerLoad(wid, "prefill", queued_tokens=queued, prefill_tps=tps, zone=zone, num_blocks=1000,
                      free_blocks=1000, **kw)


def D(wid, tps=5_000.0, running=2, step=(0.02, 0.001), zone="z1", free=10_000, **kw):
    return WorkerLoad(wid, "decode", running=running, prefill_tps=tps, decode_step_s=step, zone=zone,
                      num_blocks=10_000, free_blocks=free, **kw)


# estimators
def test_rate_estimator_prior_then_learns():
    r = RateEstimator(prior_tps=1000.0, alpha=0.2)
    assert r.rate == pytest.approx(1000.0) and r.count == 0
    r.observe(0, 1.0)                                    # empty samples are ignored
    assert r.rate == pytest.approx(1000.0) and r.count == 0
    r.observe(250, 1.0)                                  # the first sample replaces the prior whole
    assert r.rate == pytest.approx(250.0) and r.count == 1
    for _ in range(40):
        r.observe(4000, 0.5)                             # true rate 8000 tok/s
    assert r.rate == pytest.approx(8000.0, rel=0.01) and r.count == 41


def test_a_workers_first_status_poll_is_a_sample():
    t = Telemetry(CostConfig(prior_prefill_tps=2000.0))
    w = WorkerLoad("p0", "prefill")
    t.ingest_status(w, status(prefill_tokens=256, prefill_s=0.8))   # the worker's warm-up, counted from zero
    assert t.prefill_tps(w) == pytest.approx(320.0)
    t.ingest_status(w, status(prefill_tokens=256, prefill_s=0.8))   # no change since: no new sample
    assert t.prefill_tps(w) == pytest.approx(320.0)


def test_step_time_model_fits_line_and_keeps_prior_slope_at_one_batch_size():
    m = StepTimeModel(base_s=0.02, per_seq_s=0.001, alpha=0.2)
    assert m.step_s(10) == pytest.approx(0.03)
    for i in range(60):
        n = 1 + (i * 7) % 32
        m.observe(n, 0.005 + 0.0005 * n)                 # truth: 5 ms + 0.5 ms per sequence
    a, b = m.coeffs()
    assert a == pytest.approx(0.005, rel=0.05) and b == pytest.approx(0.0005, rel=0.05)
    flat = StepTimeModel(0.02, 0.001)
    for _ in range(60):
        flat.observe(8, 0.04)                            # every step at batch 8
    assert flat.step_s(8) == pytest.approx(0.04, rel=0.02)
    assert flat.coeffs()[1] == pytest.approx(0.001, rel=0.2)   # slope stays near the prior's


def test_telemetry_learns_from_status_counter_deltas():
    t = Telemetry(cfg(prior_prefill_tps=2000.0))
    p, d = WorkerLoad("p0", "prefill"), WorkerLoad("d0", "decode")
    assert t.prefill_tps(p) == pytest.approx(2000.0)
    tok = busy = 0
    for i in range(30):                                  # prefill steps: tokens and busy seconds
        tok, busy = tok + 3000, busy + 0.5
        t.ingest_status(p, status(prefill_tokens=tok, prefill_s=busy, steps=i, tokens=tok, busy_s=busy,
                                  waiting_tokens=70))
    assert t.prefill_tps(p) == pytest.approx(6000.0, rel=0.02) and p.waiting_tokens == 70
    # split counters on a decode worker: decode steps at batch 4, 10 ms each, and a local prefill rate
    s = EngineFigures()
    for _ in range(40):
        s = replace(s, decode_steps=s.decode_steps + 10, decode_seqs=s.decode_seqs + 40, decode_s=s.decode_s + 0.1,
                    prefill_tokens=s.prefill_tokens + 500, prefill_s=s.prefill_s + 0.25)
        t.ingest_status(d, WorkerStatus("d0", "decode", "inc", 1, s, running=4))
    assert d.running == 4
    assert t.step_s(d, 4) == pytest.approx(0.01, rel=0.05)
    assert t.prefill_tps(d) == pytest.approx(2000.0, rel=0.02)
    before = t.prefill_tps(p)
    t.ingest_status(p, status(prefill_tokens=10, prefill_s=0.001, tokens=10, steps=1, busy_s=0.001))  # a restart
    assert t.prefill_tps(p) == before


# links
def test_links_measured_zone_measured_and_zone_prior():
    c = cfg(intra_zone_bps=1e9, cross_zone_bps=1e8, zone_pair_bps=(("east", "far", 1e7),), probe_after_s=30.0)
    t = Telemetry(c)
    zones = {"p0": "east", "p1": "east", "d0": "west", "d1": "west", "d2": "east"}
    assert t.links.bandwidth("p0", "d2", "east", "east") == (1e9, "zone-prior")
    assert t.links.bandwidth("p0", "d0", "east", "west") == (1e8, "zone-prior")
    assert t.links.bandwidth("p0", "dx", "far", "east") == (1e7, "zone-prior")   # configured pair, both ways
    m = BandwidthMeter(alpha=1.0)
    m.record("p0", "d0", 3_000_000, 1.0, now=100.0)      # a measured cross-zone link: 3 MB/s
    t.ingest_status(WorkerLoad("p0", "prefill"), status(links=links_of(m)), zones)
    assert t.links.bandwidth("p0", "d0", "east", "west") == (3e6, "measured")
    # an unmeasured link of the same zone pair is priced from the pair's measurements, not the prior
    assert t.links.bandwidth("p1", "d1", "east", "west") == (3e6, "zone-measured")
    assert t.links.bandwidth("p1", "d2", "east", "east") == (1e9, "zone-prior")
    assert not t.links.probe_needed("p0", "d0", now=110.0)
    assert t.links.probe_needed("p0", "d0", now=131.0)   # idle longer than probe_after_s
    assert t.links.probe_needed("p1", "d1", now=110.0)   # never measured
    assert t.links.probes_needed(["p0", "p1"], ["d0"], now=110.0) == [("p1", "d0")]


# crafted choices
def test_cached_prefill_worker_wins():
    ix = PrefixIndex()
    hs = block_hashes(list(range(1, 2049)), BS, "t1")    # 128 blocks
    ix.apply("p1", "stored", hs[:120], now=0.0)
    cm = CostModel(cfg(), index=ix)
    ps, ds = [P("p0"), P("p1")], [D("d0", running=8)]
    dec = cm.choose(2048, ps, ds, hashes=hs, now=1.0)
    assert (dec.prefill, dec.decode, dec.kind) == ("p1", "d0", "remote")
    assert dec.estimate["cached_tokens"] == 120 * BS
    assert dec.estimate["compute_s"] == pytest.approx((2048 - 1920) / 10_000)
    # another tenant's identical prompt has different hashes: no hit, the tie goes to p0
    other = block_hashes(list(range(1, 2049)), BS, "t2")
    assert cm.choose(2048, ps, ds, hashes=other, now=1.0).prefill == "p0"


def test_stale_index_entries_are_discounted():
    ix = PrefixIndex(silent_after_s=5.0, tau_s=10.0, horizon_s=60.0)
    hs = block_hashes(list(range(1, 2049)), BS)
    ix.apply("p1", "stored", hs, now=0.0)
    cm = CostModel(cfg(), index=ix)
    ps, ds = [P("p0"), P("p1")], [D("d0", running=8)]
    fresh = cm.choose(2048, ps, ds, hashes=hs, now=1.0)
    old = cm.choose(2048, ps, ds, hashes=hs, now=30.0)
    assert fresh.prefill == old.prefill == "p1"
    assert fresh.estimate["cached_tokens"] == 2032          # the last token always computes
    assert 0 < old.estimate["cached_tokens"] < fresh.estimate["cached_tokens"]
    assert cm.choose(2048, ps, ds, hashes=hs, now=100.0).estimate["cached_tokens"] == 0   # past the horizon


def test_mostly_cached_prompt_prefills_locally_on_the_decode_worker():
    ix = PrefixIndex()
    hs = block_hashes(list(range(1, 2049)), BS)
    cm = CostModel(cfg(), index=ix)
    ps, ds = [P("p0")], [D("d0", running=2)]
    assert cm.choose(2048, ps, ds, hashes=hs, now=0.0).kind == "remote"
    ix.apply("d0", "stored", hs[:125], now=0.0)             # d0 holds 2000 of the 2048 tokens
    dec = cm.choose(2048, ps, ds, hashes=hs, now=0.0)
    assert (dec.prefill, dec.decode, dec.kind) == (None, "d0", "local")
    assert dec.estimate["compute_s"] == pytest.approx(48 / 5000)


def test_slow_cross_zone_link_makes_local_prefill_win():
    cm = CostModel(cfg(intra_zone_bps=1.25e9, cross_zone_bps=2.5e7))
    near = cm.choose(2048, [P("p0", zone="east")], [D("d0", zone="east")])
    far = cm.choose(2048, [P("p0", zone="east")], [D("d0", zone="west")])
    assert near.kind == "remote" and near.estimate["bandwidth_source"] == "zone-prior"
    assert far.kind == "local"
    remote_far = cm.estimate_remote(2048, P("p0", zone="east"), D("d0", zone="west"))
    assert remote_far.exposed_transfer_s == pytest.approx(2048 * KVB / 2.5e7 - 2048 / 10_000)
    assert remote_far.probe_needed
    # a measurement showing the cross-zone link is actually fast turns it back to remote
    m = BandwidthMeter(alpha=1.0)
    m.record("p0", "d0", 2_000_000_000, 1.0)
    cm.telemetry.links.ingest(links_of(m), {"p0": "east", "d0": "west"})
    fast = cm.choose(2048, [P("p0", zone="east")], [D("d0", zone="west")])
    assert fast.kind == "remote" and fast.estimate["bandwidth_source"] == "measured"


def test_layerwise_overlap_hides_transfer_behind_compute():
    cm = CostModel(cfg())
    e = cm.estimate_remote(1024, P("p0", tps=1000.0), D("d0"))    # compute 1.02 s >> transfer
    assert e.transfer_s == pytest.approx(1024 * KVB / 1.25e9)
    assert e.exposed_transfer_s == pytest.approx(e.transfer_s / 30)  # only the last layer shows


def test_full_decode_pool_excluded():
    cm = CostModel(cfg())
    ps = [P("p0")]
    ds = [D("d0", running=0, free=10), D("d1", running=30)]        # d0 is idle but cannot hold 2048 tokens
    dec = cm.choose(2048, ps, ds)
    assert dec.decode == "d1" and dec.estimate["blocks_needed"] == 129
    # no pool has the blocks now: a remote reservation would fail, a local prefill queues at d0
    full = cm.choose(2048, ps, [D("d0", running=0, free=10)])
    assert (full.kind, full.decode, full.estimate["kv_ok"]) == ("local", "d0", False)
    assert cm.choose(2048, ps, ds, exclude={"d1"}).kind == "local"
    assert cm.choose(2048, ps, [replace(D("d0", free=10), num_blocks=100)]) is None   # would never fit
    off = CostModel(cfg(allow_local=False)).choose(2048, ps, [D("d0", free=10)])   # no local fallback: the
    assert (off.kind, off.defer) == ("remote", True)                                # remote one, waiting for room
    assert cm.choose(100, ps, [D("d0", running=0, free=10)]).decode == "d0"   # a short one still fits
    fresh = WorkerLoad("d9", "decode")                                # never polled: capacity unknown
    assert cm.choose(2048, ps, [fresh]).decode == "d9"
    assert cm.choose(2048, ps, [D("d0", healthy=False)]) is None


def test_a_prompt_whose_first_token_fills_a_whole_pool_is_placed():
    """A pool of 68 blocks holds 1,088 tokens. A 1,075-token prompt and its first token take 68 of
    them: the engine admits it (prompt + max_tokens <= 1,088). Before, the router counted a whole
    extra block beyond the prompt's (69 > 68) and answered UNAVAILABLE ("no worker could take")."""
    cm = CostModel(cfg())
    pool = [replace(D("d0", running=0, free=68), num_blocks=68), replace(D("d1", running=0, free=68), num_blocks=68)]
    for pick in (cm.choose, cm.choose_scan, cm.choose_exhaustive):
        got = pick(1075, [], pool)
        assert got is not None and (got.kind, got.estimate["kv_ok"], got.estimate["blocks_needed"]) == \
            ("local", True, 68)
        assert pick(1087, [], pool).estimate["blocks_needed"] == 68     # the last token slot of the pool
        assert pick(1088, [], pool) is None        # prompt alone fills the pool: its first token never fits


def test_tpot_guard():
    # d0 holds the prompt's prefix (cheapest by far over a slow link) but one more request would
    # push its decode step past the SLO; d1 is chosen instead
    ix = PrefixIndex()
    hs = block_hashes(list(range(1, 4097)), BS)
    ix.apply("d0", "stored", hs[:250], now=0.0)
    cm = CostModel(cfg(cross_zone_bps=1.25e8, tpot_slo_s=0.1), index=ix)
    ps = [P("p0", zone="east")]
    d0 = D("d0", running=40, step=(0.02, 0.002), zone="west")        # step(41) = 0.102 s
    d1 = D("d1", running=10, zone="west")
    unguarded = CostModel(cfg(cross_zone_bps=1.25e8, tpot_slo_s=None), index=ix)
    assert unguarded.choose(4096, ps, [d0, d1], hashes=hs, now=0.0).decode == "d0"
    dec = cm.choose(4096, ps, [d0, d1], hashes=hs, now=0.0)
    assert dec.decode == "d1" and dec.estimate["tpot_ok"]
    # every option past the guard: the cheapest still serves (soft), or None when strict
    soft = cm.choose(4096, ps, [d0], hashes=hs, now=0.0)
    assert soft.decode == "d0" and not soft.estimate["tpot_ok"]
    assert CostModel(cfg(tpot_slo_s=0.1, tpot_strict=True), index=ix).choose(4096, ps, [d0], hashes=hs) is None
    # local prefill with requests running: one prefill chunk's step must also fit the SLO
    e = cm.estimate_local(4096, D("d2", running=4), 0.0)
    assert e.step_s_after == pytest.approx(0.024 + 512 / 5000) and not e.tpot_ok


def test_remote_or_local_only():
    assert CostModel(cfg(allow_remote=False)).choose(4096, [P("p0")], [D("d0")]).kind == "local"
    assert CostModel(cfg(allow_local=False)).choose(16, [P("p0")], [D("d0")]).kind == "remote"
    assert CostModel(cfg(local_max_tokens=100)).choose(101, [P("p0", zone="a")],
                                                       [D("d0", zone="b")]).kind == "remote"
    assert CostModel(cfg()).choose(4096, [], [D("d0")]).kind == "local"   # no prefill worker up


# conditional disaggregation
def threshold(cm, ps, ds, lengths=range(16, 8193, 16)):
    """The first prompt length that goes remote; every length after it must go remote too."""
    kinds = [cm.choose(n, ps, ds).kind for n in lengths]
    if "remote" not in kinds:
        return None
    i = kinds.index("remote")
    assert set(kinds[:i]) <= {"local"} and set(kinds[i:]) == {"remote"}, kinds
    return list(lengths)[i]


def test_threshold_sweep_moves_with_bandwidth_queue_and_load():
    c = cfg(intra_zone_bps=2.5e8)
    ps, ds = [P("p0", queued=1000)], [D("d0", running=2)]
    base = threshold(CostModel(c), ps, ds)
    assert base is not None and 16 < base < 8192            # short local, long remote
    # analytic crossover: (queue + overhead) / (local slope - remote slope)
    slope_local = (1 + 0.5 * 2) / 5000
    slope_remote = KVB / 2.5e8                               # transfer exceeds compute: exposed = transfer - compute
    expect = (1000 / 10_000 + 0.005) / (slope_local - slope_remote)
    assert abs(base - expect) <= 16
    slow = threshold(CostModel(replace(c, intra_zone_bps=1.25e8)), ps, ds)
    assert slow is not None and slow > base                  # half the bandwidth: more goes local
    busy_p = threshold(CostModel(c), [P("p0", queued=2000)], ds)
    assert busy_p > base                                     # a longer prefill queue: more goes local
    busy_d = threshold(CostModel(c), ps, [D("d0", running=6)])
    assert busy_d < base                                     # a busier decode worker: more goes remote
    dec = CostModel(c).choose(base, ps, ds)
    assert dec.kind == "remote" and dec.estimate["ttft_s"] > 0 and "exposed_transfer_s" in dec.estimate


def test_router_registers_each_workers_zone_and_prices_cross_zone_links_apart():
    from pdcluster.router.config import RouterConfig
    from pdcluster.router.lifecycle import Router

    class Client:
        def __init__(self, wid):
            self.worker_id = wid

    r = Router(RouterConfig(), None, (2,), 2048, cost_config=cfg())
    r.add_worker("prefill", Client("p0"), zone="far")
    r.add_worker("decode", Client("d0"), zone="near")
    p, d = r.workers.loads["p0"], r.workers.loads["d0"]
    assert (p.zone, d.zone) == ("far", "near")
    e = r.policy.estimate_remote(1000, p, d)
    assert (e.bandwidth_bps, e.bandwidth_source) == (CostConfig().cross_zone_bps, "zone-prior")


# KV compression: transfers priced at the bytes the prefill worker's codec puts on the wire
def test_wire_bytes_per_token_matches_the_codec_and_its_policy():
    import torch

    from pdcluster.kv_transfer import codec as kvcodec
    from pdcluster.kv_transfer import codec_policy
    from pdcluster.router import cost_config as cmod

    for mode in codec_policy.MODES:      # the router takes exactly the workers' modes
        assert cmod.CostConfig(kv_compression=mode).kv_compression == mode
    with pytest.raises(ValueError, match="kv compression must be one of"):
        cmod.CostConfig(kv_compression="zstd")
    assert cmod.SCALE_BYTES == kvcodec.SCALE_BYTES
    assert cmod.CODEC_ITEM_BYTES == {c: kvcodec.QUANT[c].itemsize for c in kvcodec.CODECS if c != "none"}
    for dtype, layers, heads, head_dim, bs in ((torch.float32, 30, 3, 64, 16), (torch.bfloat16, 4, 2, 32, 8),
                                                (torch.float16, 28, 8, 128, 32)):
        kvb = 2 * layers * heads * head_dim * dtype.itemsize
        block = torch.zeros(bs, heads, head_dim, dtype=dtype)
        for codec in kvcodec.CODECS:
            want = kvcodec.block_wire_bytes(block, codec) * layers / bs    # one block of every layer, per token
            assert cmod.wire_bytes_per_token(codec, kvb, dtype.itemsize, layers, heads, bs) == pytest.approx(want)
    c = cfg(kv_compression="int8")
    assert c.wire_bytes_per_token("int8") == 2 * 30 * 3 * 64 + 2 * 30 * 3 * 4 / BS == 11_565   # vs 46_080
    with pytest.raises(ValueError):
        cfg(kv_compression="zstd")


def test_for_model_carries_the_kv_geometry_and_compression():
    from pdcluster.engine.config import ModelConfig
    m = ModelConfig(name="m", path="", vocab_size=10, hidden_size=64, intermediate_size=128, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=16)
    c = CostConfig.for_model(m, 2, 8, kv_compression="fp8")
    assert (c.kv_bytes_per_token, c.num_kv_heads, c.kv_dtype_bytes, c.block_size) == (2 * 4 * 32 * 2, 2, 2, 8)
    assert c.wire_bytes_per_token("fp8") == 2 * 4 * 32 + 2 * 4 * 2 * 4 / 8


def test_int8_prices_the_transfer_at_its_wire_bytes_and_can_flip_local_to_remote():
    slow = dict(cross_zone_bps=5e7)
    ps, ds = [P("p0", zone="east")], [D("d0", zone="west")]
    off, int8 = CostModel(cfg(**slow)), CostModel(cfg(kv_compression="int8", **slow))
    e_off, e_int8 = off.estimate_remote(2048, ps[0], ds[0]), int8.estimate_remote(2048, ps[0], ds[0])
    assert (e_off.kv_codec, e_int8.kv_codec) == ("none", "int8")
    assert e_off.transfer_bytes == 2048 * KVB
    assert e_int8.transfer_bytes / e_off.transfer_bytes == pytest.approx(11_565 / KVB, rel=1e-12)
    assert e_int8.transfer_s / e_off.transfer_s == pytest.approx(11_565 / KVB, rel=1e-12)
    assert off.choose(2048, ps, ds).kind == "local"          # 1.9 s of KV on a 50 MB/s link
    dec = int8.choose(2048, ps, ds)
    assert dec.kind == "remote" and dec.estimate["kv_codec"] == "int8"   # a quarter of it: remote wins
    fp8 = CostModel(cfg(kv_compression="fp8", **slow)).estimate_remote(2048, ps[0], ds[0])
    assert fp8.transfer_bytes == e_int8.transfer_bytes       # same size on the wire
    # the decode worker's cached prefix is skipped either way
    part = int8.estimate_remote(2048, ps[0], ds[0], cached_d=1024)
    assert part.transfer_bytes == pytest.approx(1024 * 11_565)


def test_auto_prices_what_the_prefill_workers_policy_picks():
    from pdcluster.kv_transfer.codec_policy import CompressionPolicy

    policy = CompressionPolicy("auto")
    cm = CostModel(cfg(kv_compression="auto", cross_zone_bps=5e7))
    p, d = P("p0", zone="east"), D("d0", zone="west")
    # unmeasured link (zone prior): the worker does not know it yet and sends uncompressed
    e = cm.estimate_remote(2048, p, d)
    assert e.bandwidth_source == "zone-prior" and e.kv_codec == "none" and e.transfer_bytes == 2048 * KVB
    assert cm.choose(2048, [p], [d]).kind == "local"
    nbytes, compute_s = 2048 * KVB, 2048 / 10_000           # 128 whole blocks; p's rate override

    def measured(bps):
        m = BandwidthMeter(alpha=1.0)
        m.record("p0", "d0", int(bps), 1.0)
        cm.telemetry.links.ingest(links_of(m))
        return cm.estimate_remote(2048, p, d)

    slow = measured(5e7)                                     # link-bound: 1.9 s of KV vs 0.2 s of compute
    assert slow.bandwidth_source == "measured"
    assert slow.kv_codec == policy.choose(nbytes, compute_s, 5e7) == "int8"
    assert slow.transfer_bytes == pytest.approx(2048 * 11_565)
    assert cm.choose(2048, [p], [d]).kind == "remote"
    fast = measured(2e9)                                     # compute-bound: nothing to gain
    assert fast.kv_codec == policy.choose(nbytes, compute_s, 2e9) == "none" and fast.transfer_bytes == 2048 * KVB
    # no rate override: the worker's lifetime rate from its polled counters; none before its first prefill
    q = WorkerLoad("p0", "prefill", zone="east", num_blocks=1000, free_blocks=1000)
    measured(5e7)
    assert cm.estimate_remote(2048, q, d).kv_codec == policy.choose(nbytes, None, 5e7) == "none"
    cm.telemetry.ingest_status(q, status(prefill_tokens=40_000, prefill_s=2.0))   # 20k tok/s: 0.1 s
    assert cm.estimate_remote(2048, q, d).kv_codec == policy.choose(nbytes, 0.1024, 5e7) == "int8"
    cm.telemetry.ingest_status(q, status(prefill_tokens=40_000, prefill_s=80.0))  # 500 tok/s: 4 s
    assert cm.estimate_remote(2048, q, d).kv_codec == policy.choose(nbytes, 4.096, 5e7) == "none"


def test_duplicate_penalty_keeps_a_prompt_on_its_prefix_holder_until_the_queue_outweighs_the_repeat():
    ix = PrefixIndex()
    hs = block_hashes(list(range(1, 409)), BS)               # 408 tokens: 25 full blocks
    ix.apply("d0", "stored", hs[:24], now=0.0)               # d0 holds the 384-token prefix
    loads = lambda queued: [D("d0", tps=200.0, running=0, queued_tokens=queued), D("d1", tps=200.0, running=0)]
    plain = CostModel(cfg(duplicate_penalty=0.0), index=ix)
    cm = CostModel(cfg(), index=ix)                          # default: 1.0
    # d0 has 2 s of queue: by TTFT alone d1 (408 tokens, 2.04 s) edges out d0 (2 s + 24 tokens)
    assert plain.choose(408, [], loads(400), hashes=hs, now=0.0).decode == "d1"
    dec = cm.choose(408, [], loads(400), hashes=hs, now=0.0)
    assert dec.decode == "d0" and dec.estimate["duplicate_penalty_s"] == 0.0
    away = {e.decode: e for e in cm.estimates(408, [], loads(400), hashes=hs, now=0.0)}["d1"]
    assert away.duplicate_penalty_s == pytest.approx(384 / 200.0)
    assert away.cost_s == pytest.approx(away.ttft_s + 384 / 200.0)
    # 6 s of queue on the holder outweighs repeating the prefix: it moves
    assert cm.choose(408, [], loads(1200), hashes=hs, now=0.0).decode == "d1"
    # nobody holds anything: no penalty anywhere
    cold = block_hashes(list(range(5000, 5408)), BS)
    assert all(e.duplicate_penalty_s == 0.0 for e in cm.estimates(408, [], loads(400), hashes=cold, now=0.0))


# cache tiers (issue 19 point 2): device hits are free, host and disk hits cost their load
def test_host_hit_beats_a_cold_worker_while_loading_is_cheaper_than_recompute():
    ix = PrefixIndex()
    hs = block_hashes(list(range(1, 1025)), BS)             # 64 blocks
    ix.apply("d1", "stored", hs[:60], now=0.0, tier="host")
    ds = [D("d0", running=0), D("d1", running=0)]
    cm = CostModel(cfg(allow_remote=False, prior_host_load_bps=1e9), index=ix)
    dec = cm.choose(1024, [], ds, hashes=hs, now=1.0)
    assert (dec.decode, dec.kind) == ("d1", "local")
    assert dec.estimate["cached_tokens"] == 960
    assert dec.estimate["tier_load_s"] == pytest.approx(960 * KVB / 1e9)     # bytes / rate
    assert dec.estimate["compute_s"] == pytest.approx(64 / 5000)
    # control: a slow host tier loses: 0.44 s of loading vs recomputing all 1024 tokens (0.2 s) plus the
    # duplicate penalty of repeating d1's prefix (0.19 s)
    slow = CostModel(cfg(allow_remote=False, prior_host_load_bps=1e8), index=ix)
    assert slow.choose(1024, [], ds, hashes=hs, now=1.0).decode == "d0"
    # a disk hit is priced at the disk rate
    ix.remove_worker("d1")
    ix.apply("d1", "stored", hs[:60], now=0.0, tier="disk")
    est = cm.choose(1024, [], ds, hashes=hs, now=1.0).estimate
    assert est["decode"] == "d1" and est["tier_load_s"] == pytest.approx(960 * KVB / cm.cfg.prior_disk_load_bps)


def test_device_hit_beats_a_host_hit_and_the_load_rate_is_learned():
    ix = PrefixIndex()
    hs = block_hashes(list(range(1, 1025)), BS)
    ix.apply("p0", "stored", hs[:60], now=0.0, tier="host")
    ix.apply("p1", "stored", hs[:60], now=0.0)
    ix.apply("p1", "stored", hs[:60], now=0.0, tier="disk")  # also on disk: device is what counts
    cm = CostModel(cfg(allow_local=False), index=ix)
    ps, ds = [P("p0"), P("p1")], [D("d0")]
    dec = cm.choose(1024, ps, ds, hashes=hs, now=1.0)
    assert dec.prefill == "p1" and dec.estimate["tier_load_s"] == 0.0
    byp = {e.prefill: e for e in cm.estimates(1024, ps, ds, hashes=hs, now=1.0)}
    assert byp["p0"].cached_tokens == byp["p1"].cached_tokens == 960
    assert byp["p0"].ttft_s - byp["p1"].ttft_s == pytest.approx(byp["p0"].tier_load_s)
    # p0's host loads, as its status polls report them: 1 GB/s learned over the 2 GB/s prior
    b = s = 0.0
    for _ in range(20):
        b, s = b + 1e8, s + 0.1
        cm.telemetry.ingest_status(ps[0], status(host_load_bytes=int(b), host_load_s=s))
    assert cm.telemetry.tier_load_bps(ps[0], "host") == pytest.approx(1e9)
    assert byp["p0"].tier_load_s == pytest.approx(960 * KVB / cm.cfg.prior_host_load_bps)
    learned = {e.prefill: e for e in cm.estimates(1024, ps, ds, hashes=hs, now=1.0)}["p0"]
    assert learned.tier_load_s == pytest.approx(960 * KVB / 1e9)


def test_the_last_token_cap_cuts_disk_then_host_blocks():
    ix = PrefixIndex()
    hs = block_hashes(list(range(1, 65)), BS)               # 4 blocks, all cached: the cap keeps 3
    ix.apply("d0", "stored", hs[:2], now=0.0)
    ix.apply("d0", "stored", hs[2:3], now=0.0, tier="host")
    ix.apply("d0", "stored", hs[3:], now=0.0, tier="disk")
    cm = CostModel(cfg(allow_remote=False, prior_host_load_bps=1e9, prior_disk_load_bps=1e6), index=ix)
    est = cm.choose(64, [], [D("d0")], hashes=hs, now=1.0).estimate
    assert est["cached_tokens"] == 48 and est["tier_load_s"] == pytest.approx(16 * KVB / 1e9)


def test_a_transfer_skips_the_decode_workers_device_and_host_blocks_not_its_disk_ones():
    """A reservation loads d's host blocks in step (engine/scheduler.py add_remote): they do not cross."""
    hs = block_hashes(list(range(1, 1025)), BS)             # 64 blocks
    cached_d = {}
    for tier in ("device", "host", "disk"):
        ix = PrefixIndex()
        ix.apply("d0", "stored", hs[:20], now=0.0)
        ix.apply("d0", "stored", hs[20:40], now=0.0, tier=tier)
        cm = CostModel(cfg(allow_local=False), index=ix)
        cached_d[tier] = cm.choose(1024, [P("p0")], [D("d0")], hashes=hs, now=1.0).estimate["cached_tokens_decode"]
    assert cached_d == {"device": 640, "host": 640, "disk": 320}


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_lower_tier_hit_needs_device_blocks_to_load_into(tier):
    """The engine loads a host or disk hit into fresh device blocks (scheduler._start_load): only device hits
    spare d's free blocks. 64 blocks + a tail: 20 held on d's device, 40 below, 30 free blocks."""
    hs = block_hashes(list(range(1, 64 * BS + 6)), BS)
    ix = PrefixIndex()
    ix.apply("d0", "stored", hs[:20], now=0.0)
    ix.apply("d0", "stored", hs[20:60], now=0.0, tier=tier)
    for remote in (False, True):
        cm = CostModel(cfg(allow_local=not remote, allow_remote=remote), index=ix)
        ps = [P("p0")] if remote else []
        for e in cm.estimates(64 * BS + 5, ps, [D("d0", free=30)], hashes=hs, now=1.0):
            assert (e.resident_tokens_decode, e.blocks_needed, e.kv_ok) == (20 * BS, 45, False)
        full = [pick(64 * BS + 5, ps, [D("d0", free=30)], hashes=hs, now=1.0) for pick in (cm.choose,
                                                                                           cm.choose_exhaustive)]
        assert full[0] == full[1] and (full[0] is None or not full[0].estimate["kv_ok"])    # (the KV-full fallback's)
        for pick in (cm.choose, cm.choose_exhaustive):
            est = pick(64 * BS + 5, ps, [D("d0", free=45)], hashes=hs, now=1.0).estimate
            assert (est["blocks_needed"], est["kv_ok"]) == (45, True)
# the KV-full fallback (kv_full_defer): every decode pool full now
def test_kv_full_fallback_defers_to_a_usable_remote_prefill():
    """Before: the local fallback was taken at once (prefilled on a slow decode worker while its batch
    stalled: the fleet collapse of bench/RESULTS.md "KV-full fallback"). Now it is marked `defer` (the
    router waits for room) whenever a remote prefill worker is usable."""
    ps, full = [P("p0")], [D("d0", running=3, free=10), D("d1", running=1, free=20)]
    for c in (cfg(), cfg(kv_full_fallback="wait")):
        cm = CostModel(c)
        for pick in (cm.choose, cm.choose_exhaustive):
            fb = pick(2048, ps, full)
            assert (fb.kind, fb.decode, fb.estimate["kv_ok"], fb.defer) == ("local", "d1", False, True)
            # control: nothing to wait for without a usable prefill worker: taken at once, as before
            assert pick(2048, [], full).defer is False
            assert pick(2048, [P("p0", healthy=False)], full).defer is False
            assert pick(2048, ps, full, exclude={"p0"}).defer is False
            # room somewhere: no fallback, nothing deferred
            assert pick(2048, ps, full + [D("d2")]).defer is False
    no_remote = CostModel(cfg(allow_remote=False))
    assert no_remote.choose(2048, ps, full).defer is False
    old = CostModel(cfg(kv_full_fallback="local"))                  # the old rule, kept as an option
    assert old.choose(2048, ps, full).defer is False and old.choose(2048, ps, full).kind == "local"
    with pytest.raises(ValueError, match="kv_full_fallback"):
        cfg(kv_full_fallback="refuse")


def test_kv_full_fallback_cheapest_compares_kinds_as_if_d_had_room():
    """"cheapest": both kinds wait for the same blocks, so defer only when the remote option would be
    the cheaper one with room."""
    cm = CostModel(cfg(kv_full_fallback="cheapest"))
    full = [D("d0", running=0, free=10, tps=5_000.0)]
    fast_p, slow_p = [P("p0", tps=50_000.0)], [P("p0", tps=500.0, queued=50_000)]
    for pick in (cm.choose, cm.choose_exhaustive):
        assert pick(2048, fast_p, full).defer is True               # remote 0.04 s vs local 0.4 s
        slow = pick(2048, slow_p, full)                              # remote: 100 s of queue ahead
        assert (slow.kind, slow.defer) == ("local", False)
    # control: the same prompts with room are placed that way outright
    room = [D("d0", running=0, tps=5_000.0)]
    assert cm.choose(2048, fast_p, room).kind == "remote" and cm.choose(2048, slow_p, room).kind == "local"


def test_estimate_as_dict_holds_its_fields_alone():
    """as_dict: every field by name, in field order, a copy (writing it leaves the estimate alone);
    an attribute set on the estimate outside its fields is left out."""
    e = Estimate("remote", "p0", "d0", cost_s=1.5)
    d = e.as_dict()
    assert list(d) == [f.name for f in fields(Estimate)] and d["cost_s"] == 1.5 and d["prefill"] == "p0"
    d["cost_s"] = 9.0
    assert e.cost_s == 1.5
    e.note = "extra"
    assert list(e.as_dict()) == [f.name for f in fields(Estimate)]


def test_a_local_option_waits_behind_the_decode_workers_own_scheduler_queue():
    """A decode worker whose scheduler reports 100,000 waiting prompt tokens (preempted requests to
    recompute, say: none of them this router's queued ones) is not an idle place for a local prefill.
    Before, a local option priced queued_tokens alone (the remote ones took the larger of the two), and
    both decode workers looked idle. Every chooser (scalar estimates, the scan, the vectorized columns)."""
    ds = [WorkerLoad("d0", "decode", num_blocks=4000, free_blocks=4000, prefill_tps=2000.0, waiting_tokens=100_000),
          WorkerLoad("d1", "decode", num_blocks=4000, free_blocks=4000, prefill_tps=2000.0)]
    cm = CostModel(CostConfig())
    by = {e.decode: e for e in cm.estimates(200, [], ds, now=0.0)}
    assert by["d0"].queue_s == pytest.approx(50.0) and by["d1"].queue_s == 0.0
    for choose in (cm.choose, cm.choose_scan, cm.choose_exhaustive):    # the columns, the scan, every option
        assert choose(200, [], ds, now=0.0).decode == "d1"


@pytest.mark.parametrize("cfg", [dict(allow_local=False), dict(local_max_tokens=512)])
def test_every_pool_full_without_a_local_fallback_waits_for_room_on_a_remote_option(cfg):
    """Before, no option came back (the KV-full fallback was local only): place() answered UNAVAILABLE
    at once though a remote placement fits as soon as a running request frees its blocks."""
    ps = [WorkerLoad("p0", "prefill", prefill_tps=2e4)]
    ds = [WorkerLoad("d0", "decode", num_blocks=1000, free_blocks=3, running=20)]
    cm = CostModel(CostConfig(**cfg))
    for choose in (cm.choose, cm.choose_scan, cm.choose_exhaustive):
        got = choose(2000, ps, ds, now=0.0)
        assert (got.kind, got.prefill, got.decode, got.defer) == ("remote", "p0", "d0", True)
    assert CostModel(CostConfig()).choose(2000, ps, ds, now=0.0).kind == "local"     # local allowed: as before
    ds[0].num_blocks = 100                                 # a pool that can never hold it: nothing
    assert cm.choose(2000, ps, ds, now=0.0) is None


def test_a_reservations_hits_in_free_cached_blocks_are_not_counted_free_as_well():
    """The engine counts a free block that holds a cached prefix block as free, and a prompt hitting it takes
    it (KVCacheManager.can_allocate: need + hits from free <= free). Before, the router took those hits off
    the prompt's need and counted them free too: here 2 new blocks against 9 free said yes where the engine
    says no (2 + 8 > 9), and the reservation came back NoRoom. Workers now report free_cached_blocks.
    A local prefill is not a reservation: it waits in d's own queue, so its check is the new blocks alone
    (counting the hits there sent prompts away from their prefix's holder: bench/RESULTS.md, 12-07)."""
    from pdcluster.engine.kv_cache_manager import KVCacheManager
    from pdcluster.engine.request import Request
    from pdcluster.engine.sampling_params import SamplingParams
    bs, nb = 16, 100
    kv = KVCacheManager(nb, bs)
    prefix = list(range(1000, 1000 + 8 * bs))                   # 8 blocks computed earlier, free now, cached
    old = Request(prefix + [7], SamplingParams(max_tokens=1), block_size=bs)
    kv.allocate(old, old.num_tokens)
    old.num_computed_tokens = old.num_tokens
    kv.cache_computed_blocks(old)
    kv.free(old)
    kv.allocate(Request(list(range(5000, 5000 + 91 * bs)), SamplingParams(max_tokens=1), block_size=bs), 91 * bs)
    prompt = prefix + list(range(9000, 9000 + 2 * bs))         # 8 cached + 2 new blocks
    req = Request(prompt, SamplingParams(max_tokens=4), block_size=bs)
    hits = kv.computed_blocks(req)
    assert len(hits) == 8 and not kv.can_allocate(req, req.num_prefill_tokens - 8 * bs, hits)
    assert (kv.num_free_blocks, kv.num_free_cached_blocks) == (9, 8)
    ix = PrefixIndex()
    ix.apply("d0", "stored", block_hashes(prefix, bs), seq=1, now=0.0)
    remote_only = CostModel(CostConfig(block_size=bs, allow_local=False), ix)
    cm = CostModel(CostConfig(block_size=bs), ix)
    d0 = WorkerLoad("d0", "decode", num_blocks=nb, free_blocks=kv.num_free_blocks,
                    free_cached_blocks=kv.num_free_cached_blocks, prefill_tps=4000.0)
    p0 = WorkerLoad("p0", "prefill", prefill_tps=20000.0)
    hs = block_hashes(prompt, bs)
    est = {e.kind: e for e in cm.estimates(len(prompt), [p0], [d0], hashes=hs, now=0.0)}
    assert not est["remote"].kv_ok and est["local"].kv_ok and est["local"].blocks_needed == 3     # + first token's
    for choose in (remote_only.choose, remote_only.choose_scan, remote_only.choose_exhaustive):
        got = choose(len(prompt), [p0], [d0], hashes=hs, now=0.0)       # the KV-full fallback: wait for room
        assert got.defer and not got.estimate["kv_ok"]
    d1 = WorkerLoad("d1", "decode", num_blocks=nb, free_blocks=nb, prefill_tps=4000.0)    # roomy, no hits
    for choose in (remote_only.choose, remote_only.choose_scan, remote_only.choose_exhaustive):   # columns too
        got = choose(len(prompt), [p0], [d0, d1], hashes=hs, now=0.0)
        assert (got.kind, got.decode, got.defer) == ("remote", "d1", False)
    for choose in (cm.choose, cm.choose_scan, cm.choose_exhaustive):    # local on the holder: its hits, cheaper
        got = choose(len(prompt), [], [d0, d1], hashes=hs, now=0.0)
        assert (got.kind, got.decode, got.defer) == ("local", "d0", False)
    d0.free_cached_blocks = 0                                  # the hits in blocks another request holds: it fits
    assert all(e.kv_ok for e in cm.estimates(len(prompt), [p0], [d0], hashes=hs, now=0.0))
    for choose in (remote_only.choose, remote_only.choose_scan, remote_only.choose_exhaustive):
        assert choose(len(prompt), [p0], [d0, d1], hashes=hs, now=0.0).decode == "d0"   # its hits: cheaper
    d0.free_blocks = 2                                         # fewer than the 3 new blocks: full for either kind
    assert not any(e.kv_ok for e in cm.estimates(len(prompt), [p0], [d0], hashes=hs, now=0.0))
    for choose in (cm.choose, cm.choose_scan, cm.choose_exhaustive):
        assert choose(len(prompt), [], [d0, d1], hashes=hs, now=0.0).decode == "d1"
