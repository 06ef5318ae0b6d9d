"""router/placement/pull_pricing.py: a local prefill pulls a prefix a peer holds when the link moves it
faster than the puller recomputes it, and recomputes when the link is slow (the control)."""
import pytest

from pdcluster.engine.hashing import block_hashes
from pdcluster.kv_transfer.meter import BandwidthMeter
from pdcluster.messages import LinkFigures
from pdcluster.router.cost_config import CostConfig
from pdcluster.router.placement import WorkerLoad
from pdcluster.router.placement.cost_model import CostModel
from pdcluster.router.placement.pull_pricing import lower_blocks_in, pull_seconds, recompute_seconds
from pdcluster.router.prefix_index import PrefixIndex, TierHits

pytestmark = pytest.mark.timeout(60)

BS, KVB, L = 16, 46_080, 2048
HASHES = block_hashes(list(range(L)), BS, None)


def D(wid, tps=5_000.0, running=0, **kw):
    return WorkerLoad(wid, "decode", running=running, prefill_tps=tps, decode_step_s=(0.02, 0.001), zone="z1",
                      num_blocks=10_000, free_blocks=10_000, **kw)


def model(link_bps: float | None = None, peer_pull: bool = True, tiers=(("device", 125),), **kw) -> CostModel:
    """Decode workers only (local prefills); `holder` holds 125 of the prompt's 128 blocks and drains
    (takes no placements, still serves pulls). link_bps: the measured holder -> puller link. tiers:
    (tier, blocks) in prefix order: where the holder keeps them."""
    ix = PrefixIndex()
    at = 0
    for tier, n in tiers:
        ix.apply("holder", "stored", HASHES[at:at + n], now=0.0, tier=tier)
        at += n
    cm = CostModel(CostConfig(block_size=BS, kv_bytes_per_token=KVB, allow_remote=False, peer_pull=peer_pull,
                              duplicate_penalty=0.0, **kw), index=ix)
    if link_bps is not None:
        m = BandwidthMeter(alpha=1.0)
        m.record("holder", "puller", int(link_bps), 1.0)
        cm.telemetry.links.ingest(tuple(LinkFigures.of(s) for s in m.snapshot()))
    return cm


def choose(cm, **puller):
    return cm.choose(L, [], [D("holder", draining=True), D("puller", **puller)], hashes=HASHES, now=0.0)


def test_a_fast_link_and_long_prefix_pull_instead_of_recompute():
    dec = choose(model(link_bps=1.25e9))
    e = dec.estimate
    assert (dec.decode, dec.kind) == ("puller", "local")
    assert (e["pull_from"], e["pull_first_block"], e["pull_blocks"]) == ("holder", 0, 125)
    pull_s = pull_seconds(125, BS, KVB, 1.25e9)
    assert e["pull_s"] == pytest.approx(pull_s) == pytest.approx(2000 * KVB / 1.25e9)
    assert e["compute_s"] == pytest.approx(48 / 5000)                # only the tail computes
    assert e["ttft_s"] == pytest.approx(e["compute_s"] + pull_s + e["join_s"])
    assert pull_s < recompute_seconds(125, BS, 5000.0)


def test_a_slow_link_recomputes():
    """The control: the same prompt and holder over a slow measured link computes everything."""
    e = choose(model(link_bps=2.5e7)).estimate                       # 3.7 s to move, 0.4 s to compute
    assert e["pull_from"] is None and e["pull_blocks"] == 0
    assert e["compute_s"] == pytest.approx(L / 5000)


def test_zone_priors_price_an_unmeasured_link_and_the_flag_turns_pulls_off():
    assert choose(model(intra_zone_bps=1.25e9)).estimate["pull_from"] == "holder"
    assert choose(model(intra_zone_bps=1e7)).estimate["pull_from"] is None
    assert choose(model(link_bps=1.25e9, peer_pull=False)).estimate["pull_from"] is None


def test_the_pull_starts_after_the_pullers_own_hit_and_a_slow_puller_gains_more():
    cm = model(link_bps=1.25e9)
    cm.index.apply("puller", "stored", HASHES[:50], now=0.0)
    e = choose(cm).estimate
    assert (e["pull_first_block"], e["pull_blocks"]) == (50, 75)
    assert e["compute_s"] == pytest.approx(48 / 5000)
    # a link just too slow for a fast puller pays for a slow one
    bw = 75 * BS * KVB / (75 * BS / 5000) * 0.8                       # pull takes 1.25x the recompute at 5000 tok/s
    assert choose(model(link_bps=bw)).estimate["pull_from"] is None
    assert choose(model(link_bps=bw), tps=2000.0).estimate["pull_from"] == "holder"


def test_an_unhealthy_or_excluded_holder_is_not_pulled_from():
    cm = model(link_bps=1.25e9)
    sick = D("holder", draining=True)
    sick.healthy = False
    assert cm.choose(L, [], [sick, D("puller")], hashes=HASHES, now=0.0).estimate["pull_from"] is None
    assert cm.choose(L, [], [D("holder", draining=True), D("puller")], {"holder"}, hashes=HASHES,
                     now=0.0).estimate["pull_from"] is None


def test_a_holders_host_and_disk_blocks_are_pulled_with_their_read_time_priced():
    """The holder keeps 25 blocks on device, 60 in host memory and 40 on disk: the pull covers all
    125, and pull_s adds the holder's tier reads (at its tier load rates) to the link time."""
    host_bps, disk_bps = 4e9, 1e9
    cm = model(link_bps=1.25e9, tiers=(("device", 25), ("host", 60), ("disk", 40)),
               prior_host_load_bps=host_bps, prior_disk_load_bps=disk_bps)
    e = choose(cm).estimate
    assert (e["pull_from"], e["pull_first_block"], e["pull_blocks"]) == ("holder", 0, 125)
    per_block = BS * KVB
    read_s = 60 * per_block / host_bps + 40 * per_block / disk_bps
    assert e["pull_s"] == pytest.approx(read_s + pull_seconds(125, BS, KVB, 1.25e9))
    assert e["compute_s"] == pytest.approx(48 / 5000)
    # control: the same blocks on a holder whose disk reads crawl are not worth pulling; on device
    # only they are (so the tier read time, not the link, decided)
    slow = model(link_bps=1.25e9, tiers=(("device", 25), ("host", 60), ("disk", 40)),
                 prior_host_load_bps=host_bps, prior_disk_load_bps=1e7)
    assert choose(slow).estimate["pull_from"] is None
    assert choose(model(link_bps=1.25e9, prior_disk_load_bps=1e7)).estimate["pull_from"] == "holder"


def test_the_tier_blocks_a_pull_range_covers():
    h = TierHits(2, 3, 4)                                  # [0,2) device, [2,5) host, [5,9) disk
    assert lower_blocks_in(h, 0, 9) == (3, 4)
    assert lower_blocks_in(h, 0, 7) == (3, 2)              # capped: disk goes first
    assert lower_blocks_in(h, 0, 4) == (2, 0)
    assert lower_blocks_in(h, 3, 9) == (2, 4)              # past a local hit: host goes first
    assert lower_blocks_in(h, 6, 9) == (0, 3)
    assert lower_blocks_in(h, 1, 2) == (0, 0)
    assert lower_blocks_in(TierHits(5), 0, 5) == (0, 0)
