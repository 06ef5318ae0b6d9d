"""sim/: roofline step math, the prefix LRU, event order, the trace loader, and small end-to-end runs
that must call the router's own policy, prefix index and autoscaler. Pure Python, fast."""
import asyncio
import json
import math
from pathlib import Path

import pytest

from pdcluster.router.autoscaler import ScalingRule
from pdcluster.router.placement import make_policy
from pdcluster.sim.cache import PrefixCache
from pdcluster.sim.cluster import PoolSpec, SimConfig, Simulator, Topology
from pdcluster.sim.hardware import HARDWARE, Hardware, hardware
from pdcluster.sim.models import Model, model
from pdcluster.sim.roofline import Roofline
from pdcluster.sim.trace import Request, chain, load_trace

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]

TOY_HW = Hardware("toy", peak_flops=1e12, mem_bw=1e11, mem_bytes=10e9, price_per_h=2.0, nic_bps=1e9,
                  dtype_bytes=2, mfu=0.5, bw_eff=0.5, step_overhead_s=0.001, per_seq_overhead_s=0.0, mem_util=1.0)
TOY = Model("toy", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, params=1e9 + 2 * 1000 * 64, vocab=1000)


def test_roofline_matches_hand_computed_steps():
    r = Roofline(TOY, TOY_HW, tp=1)
    assert r.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2 == 256
    wb = 2e9 + 2 * 2 * 64000                        # every weight once: layers + embedding + head, bf16
    assert r.weight_bytes == wb
    assert r.capacity_tokens == int((10e9 - wb) // 256)
    # prefill of 1000 new tokens after 0: layers 2*1e9*1000 + head once 2*64000 + attention 4*2*64*(1000^2/2)
    flops = 2e12 + 128000 + 2.56e8
    assert r.prefill_s([(1000, 0)]) == pytest.approx(flops / 0.5e12 + 0.001)
    # 10 new tokens after 500: compute 2.0e10 flops = 0.04 s vs weights wb / 5e10 B/s
    flops = 2e9 * 10 + 128000 + 4 * 2 * 64 * (10 * 500 + 50)
    assert r.prefill_s([(10, 500)]) == pytest.approx(max(flops / 0.5e12, wb / 5e10) + 0.001)
    # decode: batch 4 holding 8000 KV tokens: bytes wb + 8000*256 over 5e10 B/s; flops tiny
    assert r.decode_s(4, 8000) == pytest.approx((wb + 8000 * 256) / 5e10 + 0.001)
    # compute-bound decode (batch 100): every token through layers and head, plus attention
    assert r.decode_s(100, 8000) == pytest.approx(((2e9 + 128000) * 100 + 4 * 2 * 64 * 8000) / 0.5e12 + 0.001)
    # two devices: 2x rates, all-reduce efficiency 0.9 on compute
    r2 = Roofline(TOY, TOY_HW, tp=2)
    assert r2.prefill_s([(1000, 0)]) == pytest.approx((2e12 + 128000 + 2.56e8) / (2 * 0.5e12 * 0.9) + 0.001)
    with pytest.raises(ValueError, match="does not fit"):
        Roofline(Model("huge", 2, 64, 4, 2, 16, 1e10), TOY_HW)


def test_profiles_case_insensitive_and_cpu_from_bench_engine_json():
    assert hardware("h200") is hardware("H200") and model("llama-3-8b") is model("Llama-3-8B")
    assert model("smollm2-135m").kv_bytes_per_token(4) == 46_080      # the engine's fp32 KV
    with pytest.raises(ValueError, match="H200"):
        hardware("tpu")
    with pytest.raises(ValueError, match="Llama-3-70B"):
        model("gpt-5")
    e = json.loads((REPO / "bench" / "engine.json").read_text())
    cpu = HARDWARE["cpu"]
    assert cpu.peak_flops == pytest.approx(e["matmul_flops"], rel=0.01)
    assert cpu.mem_bw == pytest.approx(e["read_bandwidth"], rel=0.01)
    rows = {r["kind"]: r for r in e["rows"]}
    assert cpu.mfu == pytest.approx(rows["prefill 8x512"]["of_limit"], abs=0.01)
    assert cpu.bw_eff == pytest.approx(rows["decode b=1"]["of_limit"], abs=0.01)


def test_prefix_cache_lru_and_events():
    c = PrefixCache(3)
    c.insert([1, 2])
    assert c.lookup([1, 2, 5]) == 2 and c.lookup([2]) == 1
    c.insert([7, 8])                # 4 blocks > 3: the least recently used (1) goes
    assert 1 not in c and len(c) == 3
    assert c.lookup([1, 2]) == 0    # a prefix without its first block is no hit
    c.lookup([2])                   # 2 is now the most recent; 7 the oldest
    c.resize(1)
    assert list(c._lru) == [2]
    seq, ev = c.drain()
    assert seq == 4 and [(k, h) for _, k, h in ev] == [("stored", [1, 2]), ("stored", [7, 8]), ("removed", [1]),
                                                        ("removed", [7, 8])]
    assert c.drain() == (4, [])


def test_peer_pulls_are_refused_not_simulated_as_free():
    """The router would price pulls (Telemetry, pull_pricing) that the instances never make: an error."""
    with pytest.raises(ValueError, match="peer pulls"):
        Simulator(SimConfig("smollm2-135m", decode=PoolSpec("cpu", 1), cost_overrides=(("peer_pull", True),)), [])


def test_events_run_in_time_then_insertion_order():
    sim = Simulator(SimConfig("smollm2-135m", decode=PoolSpec("cpu", 1)), [])
    seen = []
    for t, tag in ((2.0, "c"), (1.0, "a"), (1.0, "b"), (0.5, "z")):
        sim.at(t, lambda now, tag: seen.append((now, tag)), tag)
    while sim._heap:
        t, _, fn, args = __import__("heapq").heappop(sim._heap)
        fn(t, *args)
    assert seen == [(0.5, "z"), (1.0, "a"), (1.0, "b"), (2.0, "c")]


def write_trace(path, rows):
    path.write_text("".join(json.dumps(dict(timestamp=t, input_length=n, output_length=o, hash_ids=h)) + "\n"
                            for t, n, o, h in rows))
    return str(path)


def test_trace_loader(tmp_path):
    p = write_trace(tmp_path / "t.jsonl", [(0, 1100, 10, [1, 2, 3]), (2000, 600, 5, [1, 9]), (9000, 10, 1, [4])])
    rs = load_trace(p, rate_scale=2.0)
    assert [r.arrival_s for r in rs] == [0.0, 1.0, 4.5]
    assert rs[0].hashes == chain([1, 2]) and rs[1].hashes[:1] == rs[0].hashes[:1] and rs[2].hashes == ()
    assert [r.rid for r in load_trace(p, start_s=1.0, duration_s=5.0)] == [0]
    # a file cut from the middle of a trace starts at once: re-timed from its first request, not the
    # trace's 0 (which left an idle lead that the summaries' rates and the planner's cost counted)
    assert [r.arrival_s for r in load_trace(p, start_s=1.0)] == [0.0, 7.0]
    cut = write_trace(tmp_path / "cut.jsonl", [(1_875_000, 600, 5, [1]), (1_877_000, 600, 5, [2])])
    assert [r.arrival_s for r in load_trace(cut, rate_scale=2.0)] == [0.0, 1.0]
    assert len(load_trace(cut, duration_s=1.0)) == 1       # its first second, not the trace's
    (tmp_path / "bad.jsonl").write_text('{"timestamp": 0}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_trace(str(tmp_path / "bad.jsonl"))
    for ids in (None, 3, ["x"]):        # a TypeError past the line's check before
        write_trace(tmp_path / "bad.jsonl", [(0, 600, 1, ids)])
        with pytest.raises(ValueError, match="bad.jsonl:1: hash_ids"):
            load_trace(str(tmp_path / "bad.jsonl"))
    assert len(load_trace(p, limit=1)) == 1
    for limit in (0, -1):               # each gave one request
        with pytest.raises(ValueError, match="limit"):
            load_trace(p, limit=limit)


def one_request_cfg(**kw):
    return SimConfig("llama-3-8b", prefill=PoolSpec("H200", 1, zone="a"), decode=PoolSpec("H20", 1, zone=kw.pop("dzone", "a")),
                     policy="round-robin", topology=Topology(cross_zone_bps=1e9, cross_zone_latency_s=0.01), **kw)


@pytest.mark.parametrize("dzone", ["a", "b"])
def test_one_request_end_to_end_by_hand(dzone):
    cfg = one_request_cfg(dzone=dzone)
    req = Request(0, 0.0, 4096, 101, chain(range(8)))
    res = Simulator(cfg, [req]).run()
    rec = res.records[0]
    p, d = cfg.roofline("prefill"), cfg.roofline("decode")
    dt = p.prefill_s([(4096, 0)])
    nbytes = 4096 * p.kv_bytes_per_token
    bps, lat = (p.tp * p.hw.nic_bps, 20e-6) if dzone == "a" else (1e9, 0.01)
    ttft = max(nbytes / bps, dt + nbytes / bps / 32) + lat      # layer-wise: the pipe from the first chunk on
    assert (rec.kind, rec.prefill, rec.decode) == ("remote", "prefill-0", "decode-0")
    assert rec.ttft_s == pytest.approx(ttft)
    # 100 more tokens in one segment of 100 decode steps at the mid-segment KV size
    assert rec.tpot_s == pytest.approx(d.decode_s(1, 4096 + 99 / 2), rel=1e-9)
    assert rec.kv_bytes == nbytes
    assert res.gpu_hours == pytest.approx(2 * res.end_s / 3600)
    assert res.cost == pytest.approx(res.end_s / 3600 * (hardware("H200").price_per_h + hardware("H20").price_per_h))


def small_trace():
    rs, t = [], 0.0
    for i in range(40):             # 8 conversations of growing prompts sharing their history
        conv, turn = i % 8, i // 8
        ids = [1000 * conv + k for k in range(4 + 2 * turn)]
        rs.append(Request(i, t, 512 * len(ids) + 100, 50 + 7 * i, chain(ids)))
        t += 0.2
    return rs


class Spy:
    """A real policy, every call recorded."""
    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def choose(self, prompt_len, prefills, decodes, exclude=frozenset(), *, hashes=None, now=None):
        out = self.inner.choose(prompt_len, prefills, decodes, exclude, hashes=hashes, now=now)
        self.calls.append((prompt_len, [w.worker_id for w in prefills], [w.worker_id for w in decodes], hashes, now, out))
        return out


def test_it_drives_the_routers_policy_index_and_telemetry():
    cfg = SimConfig("llama-3-8b", prefill=PoolSpec("H200", 2), decode=PoolSpec("H20", 2), policy="cache-aware")
    reqs = small_trace()
    sim = Simulator(cfg, reqs)
    spy = sim.policy = Spy(sim.policy)
    res = sim.run()
    assert len(spy.calls) == res.placements >= len(reqs)
    assert {c[0] for c in spy.calls} == {r.input_len for r in reqs}
    assert all(c[1] == ["prefill-0", "prefill-1"] and c[2] == ["decode-0", "decode-1"] for c in spy.calls)
    assert [r.kind for r in res.records] == ["remote"] * len(reqs)
    # the router's index learned the caches from the polls' block events, and cache-aware used them:
    # later turns of a conversation go where its history is
    assert sim.index.num_blocks("prefill-0") + sim.index.num_blocks("prefill-1") > 0
    by_conv = {}
    for r in res.records[8:]:
        by_conv.setdefault(r.rid % 8, set()).add(r.prefill)
    assert all(len(v) == 1 for v in by_conv.values())
    assert sum(r.cached for r in res.records) > 0
    # telemetry learned rates from the instances' step counters (the prior was replaced)
    assert sim.telemetry.perf_of("prefill-0").prefill.count > 0


def test_end_to_end_is_deterministic_and_policies_differ():
    def run(policy):
        cfg = SimConfig("llama-3-8b", prefill=PoolSpec("H200", 2), decode=PoolSpec("H20", 2), policy=policy)
        return [(r.prefill, r.decode, r.first_s, r.finish_s) for r in Simulator(cfg, small_trace()).run().records]
    a, b = run("cost-model"), run("cost-model")
    assert a == b and all(x[3] is not None for x in a)
    assert run("round-robin") != a      # control: the policy matters to the outcome


def autoscaled_burst(replica_start_s: float) -> Simulator:
    """300 prompts of 30k tokens in 6 s on one H20 prefill instance the autoscaler may take to 4."""
    rule = ScalingRule("queued_prompt_tokens_per_replica", 20_000, min_replicas=1, max_replicas=4,
                       upscale_delay_s=5, downscale_delay_s=30, cooldown_s=10, max_step=2)
    rs = [Request(i, i * 0.02, 30_000, 20, chain([i, 1])) for i in range(300)]
    cfg = SimConfig("llama-3-8b", prefill=PoolSpec("H20", 1, min_count=1, max_count=4), decode=PoolSpec("H20", 2),
                    policy="least-loaded", autoscale=(("prefill", rule),), replica_start_s=replica_start_s)
    return Simulator(cfg, rs)


def test_autoscaler_adds_replicas_under_load():
    res = autoscaled_burst(10.0).run()
    ups = [x for x in res.scale_log if x[1] == "prefill" and x[2] > 0]
    assert ups and ups[0][0] >= 5.0                     # held for upscale_delay_s first
    assert any(r.prefill == "prefill-1" for r in res.records)   # a replica that joined took work
    assert res.gpu_hours > (1 + 2) * res.end_s / 3600  # the added replicas were billed


def test_an_autoscaler_action_still_waiting_at_the_end_is_cancelled():
    """A replica still loading when the last request finishes: its action was left pending on the
    closed loop ("Task was destroyed but it is pending!" at exit)."""
    sim = autoscaled_burst(1e6)
    res = sim.run()
    assert [x for x in res.scale_log if x[1] == "prefill" and x[2] > 0]     # it decided to add one...
    assert not [t for t in asyncio.all_tasks(sim.loop) if not t.done()]      # ...whose wait ended with the run


def test_cost_model_waits_for_decode_kv_instead_of_prefilling_on_a_full_h20():
    """The cost model's KV-full fallback (issue 20's collapse, bench/RESULTS.md "KV-full fallback"):
    40 prompts of 30k tokens in 2 s fill one H20's KV with reservations. Deferred (the default), the
    rest wait in the router for room and prefill on the H200; the old rule ("local", the control)
    prefilled them on the H20 (a sixth of the rate) while its batch stalled: 4x longer, TPOT 10x."""
    def run(mode):
        rs = [Request(i, i * 0.05, 30_000, 100, chain([i, 7])) for i in range(40)]
        cfg = SimConfig("llama-3-8b", prefill=PoolSpec("H200", 1), decode=PoolSpec("H20", 1),
                        cost_overrides=(("kv_full_fallback", mode),))
        return Simulator(cfg, rs).run().summary()
    new, old = run("wait"), run("local")
    assert new["router_waits"] > 10 and new["local_share"] <= 0.05      # waited, then remote
    assert new["end_s"] < 80 and new["tpot_p90"] < 0.1
    assert old["local_share"] > 0.3 and old["end_s"] > 150 and old["tpot_p90"] > 0.3


def test_slo_admission_refuses_what_would_queue_past_the_ttft_slo():
    """RouterConfig.admit_ttft_s in the simulator (router/admission.py slo_refusal, as place.py checks it):
    40 prompts of 30k tokens, one every 0.5 s, at one H200 (~1.4 s each) with a 2 s TTFT SLO. Without
    admission every prompt queues and nearly all miss; with it the router refuses those expected past
    2 s at once, and the ones it admits meet the SLO. The refused ones count against attainment."""
    rs = [Request(i, i * 0.5, 30_000, 20, chain([i, 9])) for i in range(40)]

    def run(admit, policy="cost-model", opts=()):
        cfg = SimConfig("llama-3-8b", prefill=PoolSpec("H200", 1), decode=PoolSpec("H20", 1), policy=policy,
                        slo_ttft_s=2.0, slo_tpot_s=0.2, admit_ttft_s=admit, policy_options=opts)
        res = Simulator(cfg, rs).run()
        return res.summary(), res.records
    off, _ = run(None)
    on, recs = run(2.0)
    assert off["refused"] == 0 and off["finished"] == 40 and off["slo_met"] <= 3
    assert 20 <= on["refused"] < 35 and on["finished"] == 40 - on["refused"]
    assert on["ttft_p90"] <= 2.0 and on["slo_met"] >= on["finished"] - 1 and on["slo_met"] > 3 * off["slo_met"]
    assert on["attainment"] == on["slo_met"] / 40
    refused = [r for r in recs if r.kind == "refused"]
    assert len(refused) == on["refused"] and all(r.first_s is None and r.finish_s is None for r in refused)
    # Dynamo's request rejection (busy thresholds, DynamoKV): a worker past 60k active prompt tokens is busy
    dyn, _ = run(None, "dynamo-kv", (("busy_prefill_tokens", 60_000),))
    assert dyn["refused"] > 15 and dyn["ttft_p90"] < off["ttft_p90"] / 5


def test_a_failed_try_withdraws_its_prefix_claim_as_place_py_does():
    """place.py withdraws a remote try's tentative claim (index.unexpect) when the try fails; the
    simulator kept it, so the index counted blocks on prefill-0 that it never computes, one more claim
    per retry (each status poll), for expect_ttl_s."""
    from pdcluster.sim.instances import Job
    from pdcluster.sim.results import Record
    cfg = SimConfig("llama-3-8b", prefill=PoolSpec("H200", 1), decode=PoolSpec("H20", 1), policy="least-loaded")
    req = Request(0, 0.0, 4096, 16, chain([101, 102, 103, 104, 105, 106, 107, 108]))
    sim = Simulator(cfg, [req])
    d = sim.inst["decode-0"]
    d.held = d.num_blocks       # full now; the registry's last poll still says free, so the policy picks it
    sim.records[0] = Record(0, 0.0, 4096, 16)
    job = Job(req, remaining=16)
    for k in range(3):          # NoRoom each time
        assert not sim._place(job, 0.5 * k)
    assert d.reserved == 0 and not sim.index.pending("prefill-0")
    assert sim.index.match(list(req.hashes)).get("prefill-0", 0) == 0
