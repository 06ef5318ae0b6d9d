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


# measured pulls (Telemetry.pull_s): a pull is priced from the puller's own order-to-landed times
def pull_status(wid: str, stats) -> "WorkerStatus":
    from pdcluster.messages import EngineFigures, PullFigures, WorkerStatus
    return WorkerStatus(wid, "decode", "inc", 1, EngineFigures(), pulls=PullFigures(**stats.as_dict()))


def measure_pulls(cm, load, pulls, stats=None, now=None):
    """Feed the puller's PullStats (the worker's own counters; a fresh one: a restarted worker) through
    the status poll path, one poll per (blocks, seconds, ok), at `now` (None: the wall clock). Returns
    the PullStats."""
    from pdcluster.kv_transfer.pull_stats import PullStats
    stats = stats if stats is not None else PullStats()
    for blocks, seconds, ok in pulls:
        stats.pulled(ok, blocks, blocks * BS * KVB if ok else 0, seconds)
        cm.telemetry.ingest_status(load, pull_status(load.worker_id, stats), now=now)
    return stats


def test_telemetry_learns_a_pullers_seconds_per_pull_fixed_and_per_megabyte():
    cm = model()
    puller = D("puller")
    assert cm.telemetry.pull_s(puller, 24 * BS * KVB) is None            # nothing measured: link pricing
    # 2 s per 24-block pull, 1 s per 8-block one: fixed 0.5 s + 1/16 s per block
    measure_pulls(cm, puller, [(24, 2.0, True), (8, 1.0, True)] * 6)
    per_block = BS * KVB
    assert cm.telemetry.pull_s(puller, 24 * per_block) == pytest.approx(2.0, rel=0.02)
    assert cm.telemetry.pull_s(puller, 8 * per_block) == pytest.approx(1.0, rel=0.03)
    assert cm.telemetry.pull_s(puller, 16 * per_block) == pytest.approx(1.5, rel=0.03)
    assert cm.telemetry.pull_s(D("holder"), per_block) is None           # per puller


def test_a_poll_with_a_failed_pull_or_a_restart_is_no_sample():
    cm = model()
    puller = D("puller")
    stats = measure_pulls(cm, puller, [(24, 30.0, False)])               # a failed pull: its 30 s wait
    assert cm.telemetry.pull_s(puller, 24 * BS * KVB) is None
    measure_pulls(cm, puller, [(24, 0.4, True)], stats)
    assert cm.telemetry.pull_s(puller, 24 * BS * KVB) == pytest.approx(0.4, rel=0.02)
    measure_pulls(cm, puller, [(24, 9.0, True)])                         # counters went back: a restart
    assert cm.telemetry.pull_s(puller, 24 * BS * KVB) == pytest.approx(0.4, rel=0.02)


def test_a_measured_slow_pull_keeps_the_prompt_on_its_prefixes_holder():
    """The case bench/RESULTS.md found: the link meter prices 24 blocks at ~14 ms, so a prompt whose
    prefix's holder has a short queue went to the idle peer and pulled; the pulls there took ~2 s.
    With the puller's measured pulls the holder (0.6 s of queue) wins; the control, nothing measured,
    still pulls (the old pricing)."""
    n = 24 * BS + 24                                                     # a 384-token prefix + 24-token suffix
    hashes = block_hashes(list(range(n)), BS, None)
    ix = PrefixIndex()
    ix.apply("holder", "stored", hashes[:24], now=0.0)
    cfg = CostConfig(block_size=BS, kv_bytes_per_token=KVB, allow_remote=False, peer_pull=True,
                     duplicate_penalty=0.0)         # the pull time alone (the penalty: the test below)

    def place(cm):
        holder = D("holder", tps=300.0, running=1)
        holder.queued_tokens = 180                                       # 0.6 s of prefill queued
        return cm.choose(n, [], [holder, D("puller", tps=300.0)], hashes=hashes, now=0.0)

    old = place(CostModel(cfg, index=ix))
    assert (old.decode, old.estimate["pull_from"]) == ("puller", "holder")
    cm = CostModel(cfg, index=ix)
    measure_pulls(cm, D("puller"), [(24, 2.0, True)] * 3)
    new = place(cm)
    assert (new.decode, new.estimate["pull_from"]) == ("holder", None)
    # the puller's own option is priced at its measured pull, not the link's: 2 s loses to computing
    # the prefix at 300 tokens/s (1.28 s) and wins at 100 (3.84 s)
    for tps, pull_s in ((300.0, 0.0), (100.0, 2.0)):
        opts = {e.decode: e for e in cm.estimates(n, [], [D("holder", tps=tps), D("puller", tps=tps)],
                                                  hashes=hashes, now=0.0)}
        assert opts["puller"].pull_s == pytest.approx(pull_s, rel=0.02)


def test_failed_pulls_price_the_recompute_they_fall_back_to():
    """A pull that fails (the holder evicted the blocks by the time the order came) computes them after
    all: the expected pull seconds add the puller's failure share x the recompute. 3 landed pulls,
    then 3 failed ones: the share is 2/3 of the decayed counts, which tips a fast puller to computing
    and leaves a slow one pulling, at the expected figure."""
    n = 24 * BS + 24
    hashes = block_hashes(list(range(n)), BS, None)
    ix = PrefixIndex()
    ix.apply("holder", "stored", hashes[:24], now=0.0)
    cm = CostModel(CostConfig(block_size=BS, kv_bytes_per_token=KVB, allow_remote=False, peer_pull=True,
                              duplicate_penalty=0.0), index=ix)
    stats = measure_pulls(cm, D("puller"), [(24, 0.5, True)] * 3)

    def pull_s(tps):
        return choose_n(cm, n, hashes, tps).estimate["pull_s"]

    assert cm.telemetry.pull_failure_fraction(D("puller")) == 0.0
    assert pull_s(300.0) == pytest.approx(0.5, rel=0.02)                # 0.5 s against 1.28 s of compute
    measure_pulls(cm, D("puller"), [(24, 0.2, False)] * 3, stats)
    k = 0.8                                                              # 1 - alpha, per poll
    share = (k * k + k + 1) / ((k * k + k + 1) * k ** 3 + k * k + k + 1)
    assert cm.telemetry.pull_failure_fraction(D("puller")) == pytest.approx(share)
    assert cm.telemetry.pull_s(D("puller"), 24 * BS * KVB) == pytest.approx(0.5, rel=0.02)   # failures: no sample
    assert pull_s(300.0) == 0.0                                          # 0.5 + share x 1.28 s > 1.28 s
    assert pull_s(100.0) == pytest.approx(0.5 + share * 384 / 100.0, rel=0.02)


def choose_n(cm, n, hashes, tps):
    return cm.choose(n, [], [D("holder", draining=True), D("puller", tps=tps)], hashes=hashes, now=0.0)


def test_a_pulled_copy_pays_the_duplicate_penalty_so_the_prompt_waits_a_little_for_its_holder():
    """The pull's copy of the prefix takes room in the puller's pool as a recomputed one would (it evicts
    another prefix there): the duplicate penalty counts pulled tokens as repeated. A holder 0.6 s
    busy keeps the prompt (before: the idle peer pulled the prefix for 14 ms); one 3 s busy loses it
    to the peer, which pulls rather than computes (the pull still replaces the repeat's compute)."""
    n = 24 * BS + 24
    hashes = block_hashes(list(range(n)), BS, None)
    ix = PrefixIndex()
    ix.apply("holder", "stored", hashes[:24], now=0.0)
    cm = CostModel(CostConfig(block_size=BS, kv_bytes_per_token=KVB, allow_remote=False, peer_pull=True), index=ix)

    def place(queued):
        holder = D("holder", tps=300.0, running=1)
        holder.queued_tokens = queued
        return cm.choose(n, [], [holder, D("puller", tps=300.0)], hashes=hashes, now=0.0)

    near = place(180)                                                   # 0.6 s of prefill queued
    assert (near.decode, near.estimate["pull_from"]) == ("holder", None)
    far = place(900)                                                    # 3 s
    assert (far.decode, far.estimate["pull_from"]) == ("puller", "holder")
    assert far.estimate["duplicate_penalty_s"] == pytest.approx(384 / 300.0)
    assert far.estimate["compute_s"] == pytest.approx(24 / 300.0)


def test_a_puller_that_spills_to_a_host_tier_prices_the_pulled_copy_as_a_reload_and_leaves_a_busy_holder():
    """The same prompt and holders as above, the puller's pool spilling to a host tier: what the copy
    evicts there loads back at the tier's rate instead of being recomputed, so the penalty for the 384
    pulled tokens is their reload time, and the prompt leaves a holder 0.6 s busy (the control above
    keeps it there) for the idle peer, which pulls the prefix."""
    n = 24 * BS + 24
    hashes = block_hashes(list(range(n)), BS, None)
    ix = PrefixIndex()
    ix.apply("holder", "stored", hashes[:24], now=0.0)
    cfg = CostConfig(block_size=BS, kv_bytes_per_token=KVB, allow_remote=False, peer_pull=True)
    cm = CostModel(cfg, index=ix)

    def place(queued, spill):
        holder = D("holder", tps=300.0, running=1)
        holder.queued_tokens = queued
        return cm.choose(n, [], [holder, D("puller", tps=300.0, spill_tier=spill)], hashes=hashes, now=0.0)

    assert place(180, "").decode == "holder"                            # the control: no tier, it waits
    near = place(180, "host")
    assert (near.decode, near.estimate["pull_from"]) == ("puller", "holder")
    assert near.estimate["duplicate_penalty_s"] == pytest.approx(384 * KVB / cfg.prior_host_load_bps)
    disk = place(180, "disk")                                           # a slower tier: a dearer reload
    assert disk.estimate["duplicate_penalty_s"] == pytest.approx(384 * KVB / cfg.prior_disk_load_bps)


def test_status_tiers_set_the_spill_tier():
    from pdcluster.messages import EngineFigures, TierFigures, WorkerStatus
    from pdcluster.router.telemetry import Telemetry
    t, w = Telemetry(CostConfig()), D("w")

    def poll(*tiers):
        t.ingest_status(w, WorkerStatus("w", "decode", "i", 1, EngineFigures(), 0, (), tiers=tiers), now=0.0)
        return w.spill_tier
    assert poll() == ""
    assert poll(TierFigures("disk", capacity_blocks=8), TierFigures("host", capacity_blocks=4)) == "host"
    assert poll(TierFigures("host", capacity_blocks=0), TierFigures("disk", capacity_blocks=8)) == "disk"
    assert poll() == ""


def test_blocks_a_placement_just_sent_to_the_holder_are_not_pulled_from_it():
    """The holder serves pulls from blocks it has computed. Before, the tentative blocks place() counts
    on a worker the moment it sends a prompt there were priced as pullable at link speed: the pull
    failed on the holder (nothing there yet) and the puller recomputed after waiting for it."""
    cm = model(link_bps=10e9)
    assert choose(cm).estimate["pull_blocks"] == 125                        # computed: pulled (the control)
    cm.index.apply("holder", "removed", HASHES[60:125], now=0.0)
    cm.index.expect("holder", HASHES[:125], now=0.0)                        # 60 computed, 65 just expected
    e = choose(cm).estimate
    assert (e["pull_from"], e["pull_blocks"]) == ("holder", 60)
    cm.index.apply("holder", "removed", HASHES[:60], now=0.0)
    cm.index.expect("holder", HASHES[:125], now=0.0)                        # none computed: nothing to pull
    assert choose(cm).estimate["pull_blocks"] == 0
