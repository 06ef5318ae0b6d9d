"""Peer-pull pricing over time and on the holder's side (router/placement/pull_pricing.py,
router/telemetry.py, router/lifecycle/pull.py): a slow measured pull stops pulls only until its price
fades back to the link's; the holder's serving is learned and charged to its queue while the pull runs,
and later pulls from it wait for it; the pulled option's TPOT guard looks at what is left to compute."""
import asyncio

import pytest
from prometheus_client import CollectorRegistry

from pdcluster.engine.hashing import block_hashes
from pdcluster.kv_transfer.pull_stats import PullStats
from pdcluster.router.config import RouterConfig
from pdcluster.router.cost_config import CostConfig
from pdcluster.router.lifecycle.place import _charged_until_first
from pdcluster.router.lifecycle.pull import serving_charge
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.placement.cost_model import CostModel
from pdcluster.router.placement.pull_pricing import pull_seconds
from pdcluster.router.prefix_index import PrefixIndex
from pdcluster.router.registry import WorkerRegistry
from pdcluster.router.telemetry import Telemetry

from tests.unit.test_pull_pricing import BS, KVB, D, measure_pulls, pull_status

pytestmark = pytest.mark.timeout(60)

N = 24 * BS + 24                                            # a 384-token prefix + a 24-token suffix
HASHES = block_hashes(list(range(N)), BS, None)
LINK_S = pull_seconds(24, BS, KVB, 1.25e9)                  # the 24 blocks over an unmeasured intra-zone link


def setup(**kw):
    ix = PrefixIndex()
    cfg = dict(block_size=BS, kv_bytes_per_token=KVB, allow_remote=False, peer_pull=True, duplicate_penalty=0.0,
               pull_price_half_life_s=60.0)
    cm = CostModel(CostConfig(**(cfg | kw)), index=ix)
    return cm


def place(cm, now, queued=180, holder=None):
    """The prompt, with `holder` (24 prefix blocks, `queued` tokens = 0.6 s of prefill) and an idle puller."""
    cm.index.apply("holder", "stored", HASHES[:24], now=now)     # heard from now: full confidence
    cm.index.apply("puller", "stored", [], now=now)
    h = holder or D("holder", tps=300.0, running=1)
    h.queued_tokens = queued
    return cm.choose(N, [], [h, D("puller", tps=300.0)], hashes=HASHES, now=now)


def test_a_one_off_slow_pull_stops_pulls_only_until_its_price_fades_back_to_the_links():
    """One pull measured at 2 s prices pulls out (the holder's 0.6 s queue wins, as in
    test_pull_pricing); with no pull chosen there is no new sample. The measured figure's weight halves
    every half-life, so the price returns to the link's and the next prompt pulls again (and is
    measured). Without the fading the 2 s stays forever (the control: half_life huge)."""
    cm = setup()
    stats = measure_pulls(cm, D("puller"), [(24, 2.0, True)], now=1000.0)
    assert (place(cm, 1000.0).decode, place(cm, 1030.0).decode) == ("holder", "holder")
    w = cm.telemetry.pull_weight(D("puller"), 1060.0)
    assert w == pytest.approx(0.5)
    later = place(cm, 1600.0)                                # ten half-lives on
    assert (later.decode, later.estimate["pull_from"]) == ("puller", "holder")
    measured = cm.telemetry.pull_s(D("puller"), 24 * BS * KVB)
    assert measured == pytest.approx(2.0, rel=0.02)
    assert later.estimate["pull_s"] == pytest.approx(measured / 1024 + LINK_S * (1 - 1 / 1024))
    measure_pulls(cm, D("puller"), [(24, 2.0, True)], stats, now=1600.0)   # measured again: slow again
    assert place(cm, 1600.0).decode == "holder"
    # the control: a half-life past the run keeps the stale price
    frozen = setup(pull_price_half_life_s=1e12)
    measure_pulls(frozen, D("puller"), [(24, 2.0, True)], now=1000.0)
    assert place(frozen, 1600.0).decode == "holder"


def test_a_failure_share_fades_too():
    cm = setup()
    measure_pulls(cm, D("puller"), [(24, 0.2, False)] * 3, now=0.0)
    assert cm.telemetry.pull_failure_fraction(D("puller"), 0.0) == pytest.approx(1.0)
    assert cm.telemetry.pull_failure_fraction(D("puller"), 120.0) == pytest.approx(0.25)
    assert place(cm, 0.0, queued=0).estimate["pull_from"] is None          # every pull fails: no pull
    later = place(cm, 600.0, queued=0)                                     # ten half-lives on: pulls again
    assert (later.decode, later.estimate["pull_from"]) == ("puller", "holder")


def test_telemetry_learns_a_holders_seconds_per_pull_served():
    t = Telemetry(CostConfig(block_size=BS, kv_bytes_per_token=KVB))
    holder = D("holder")
    assert t.serve_s(holder, 24 * BS * KVB) is None
    stats = PullStats()
    for blocks, seconds in [(24, 1.0), (8, 0.5)] * 6:       # fixed 0.25 s + 1/32 s per block
        stats.served_pull({"device": blocks}, blocks * BS * KVB, seconds)
        t.ingest_status(holder, pull_status("holder", stats), now=0.0)
    assert t.serve_s(holder, 24 * BS * KVB) == pytest.approx(1.0, rel=0.03)
    assert t.serve_s(holder, 16 * BS * KVB) == pytest.approx(0.75, rel=0.03)
    served = t.serve_s(holder, 24 * BS * KVB)
    assert t.pull_s(holder, 24 * BS * KVB) is None          # serving is not pulling
    stats.serve_failed()
    stats.served_pull({"device": 24}, 24 * BS * KVB, 9.0)
    t.ingest_status(holder, pull_status("holder", stats), now=0.0)       # a refusal in the poll: no sample
    assert t.serve_s(holder, 24 * BS * KVB) == served


def test_a_pull_charges_its_holders_queue_while_it_runs_and_later_pulls_wait_for_it():
    """The placement's estimate carries the holder's serving (measured: 1 s for 24 blocks) and its
    prompt-token equivalent at the holder's rate; while the puller's stream has sent nothing, the holder
    is charged both: its own options' queue grows by 1 s and a second pull from it is priced 1 s
    more. The first item (prefill done) takes the charge off."""
    cm = setup()
    reg = WorkerRegistry(RouterConfig(), RouterMetrics(CollectorRegistry()), cm.index, cm.telemetry)
    stats = PullStats()
    stats.served_pull({"device": 24}, 24 * BS * KVB, 1.0)
    holder = D("holder", tps=300.0, running=1)
    cm.telemetry.ingest_status(holder, pull_status("holder", stats), now=0.0)
    reg.loads = {"holder": holder, "puller": D("puller", tps=300.0)}
    first = place(cm, 0.0, queued=900, holder=holder)
    e = first.estimate
    assert (first.decode, e["pull_from"]) == ("puller", "holder")
    assert e["pull_serve_s"] == pytest.approx(1.0, rel=0.01) and e["pull_serve_tokens"] == pytest.approx(300.0, rel=0.01)
    assert serving_charge(first) == ("holder", round(e["pull_serve_tokens"]), e["pull_serve_s"])
    tokens, serve = serving_charge(first)[1:]
    before = {x.decode: x for x in cm.estimates(N, [], [holder, D("puller", tps=300.0)], hashes=HASHES, now=0.0)}

    async def stream():
        # the puller prefills: the holder is charged meanwhile
        during = {x.decode: x for x in cm.estimates(N, [], [holder, D("puller", tps=300.0)], hashes=HASHES, now=0.0)}
        assert holder.queued_tokens == 900 + tokens and holder.serving_s == serve
        assert during["holder"].queue_s == pytest.approx(before["holder"].queue_s + tokens / 300.0)
        assert during["puller"].pull_s == pytest.approx(before["puller"].pull_s + serve)
        yield "first token"
        yield "second"

    async def run():
        got = []
        async for item in _charged_until_first(reg, stream(), [serving_charge(first)]):
            got.append(item)
            assert holder.queued_tokens == 900 and holder.serving_s == 0.0
        return got

    assert asyncio.run(run()) == ["first token", "second"]


def test_an_unmeasured_holder_is_charged_its_read_and_the_link_time():
    cm = setup()
    e = place(cm, 0.0, queued=900).estimate
    assert e["pull_from"] == "holder" and e["pull_serve_s"] == pytest.approx(LINK_S)


def test_the_pulled_options_tpot_guard_checks_the_tail_it_computes_not_the_whole_prompt():
    """The puller runs a batch, so its local prefill stalls it a chunk per step. Recomputing the whole
    prompt (408 tokens at 2,000/s: one 0.2 s chunk) breaks a 0.15 s TPOT guard; with the prefix pulled
    only the 24-token tail computes (12 ms), within it. Before the fix the pulled option kept the full
    recompute's verdict, so the prompt went to the busy holder instead."""
    cm = setup(tpot_slo_s=0.15, local_chunk_tokens=4096)
    holder = D("holder", tps=2000.0, running=1)
    holder.queued_tokens = 6000                             # 3 s of queue: the holder loses on time
    puller = D("puller", tps=2000.0, running=4)
    cm.index.apply("holder", "stored", HASHES[:24], now=0.0)
    got = cm.choose(N, [], [holder, puller], hashes=HASHES, now=0.0)
    e = got.estimate
    assert (got.decode, e["pull_from"], e["tpot_ok"]) == ("puller", "holder", True)
    step = 0.02 + 0.001 * 4
    assert e["step_s_after"] == pytest.approx(max(0.02 + 0.001 * 5, step + 24 / 2000.0))
    # control: the same puller recomputing (pulls off) fails the guard on the whole prompt
    off = CostModel(cm.cfg.__class__(**{**cm.cfg.__dict__, "peer_pull": False}), index=cm.index)
    plain = {x.decode: x for x in off.estimates(N, [], [holder, puller], hashes=HASHES, now=0.0)}["puller"]
    assert not plain.tpot_ok and plain.step_s_after == pytest.approx(step + N / 2000.0)
