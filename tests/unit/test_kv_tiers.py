"""TierConnector (kv_transfer/tiers/) on small CPU caches, no model: write-behind of evicted blocks to
host and disk, load-back bit for bit, tenant isolation, capacity events, warm restart, corruption."""
import threading
import time

import pytest
import torch

from pdcluster.engine.block_events import BlockEventLog
from pdcluster.engine.kv_connector import KVConnector
from pdcluster.engine.request import Request
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.kv_transfer.tiers import MultiConnector, TierConfig, TierConnector
from pdcluster.kv_transfer.tiers.block_format import Geometry
from pdcluster.kv_transfer.tiers.disk import PAGE

L, NB, BS, H, D = 2, 8, 4, 2, 8
BLOCK_BYTES = 2 * L * BS * H * D * 4                     # float32 K+V of one block, every layer
QUANT_BYTES = 2 * L * BS * H * D + 2 * L * H * 4          # the same in int8 / fp8 codes + float32 scales
FILE_HEAD = PAGE                                          # a disk file's header page: fields, 2L row crcs, its crc
FILE_BYTES = 2 * PAGE                                     # header page + the block's 1 KiB payload, padded to a page


def caches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(NB, BS, H, D, generator=g) for _ in range(L)],
            [torch.randn(NB, BS, H, D, generator=g) for _ in range(L)])


def req(rid, salt=None, n=13):
    return Request(list(range(100, 100 + n)), SamplingParams(max_tokens=2), rid, salt, block_size=BS)


def tiers(tmp_path=None, host_blocks=16, disk_blocks=16, codec="none", kv=None, layerwise=False, disk_in_step=True):
    """layerwise False: every load is a whole-block one, reported by finished_loading (`load` below)."""
    events = BlockEventLog()
    disk = dict(disk_dir=str(tmp_path), disk_bytes=disk_blocks * FILE_BYTES) if tmp_path else {}
    tc = TierConnector(TierConfig(host_bytes=round(host_blocks * BLOCK_BYTES), codec=codec, layerwise=layerwise, **disk),
                       events, disk_in_step=disk_in_step)
    k, v = kv if kv is not None else caches()
    tc.register_caches(k, v)
    assert tc.wait_idle()
    return tc, events, k, v


def load(tc, r, block_ids):
    """The scheduler's half: external tokens, allocation (block_ids), wait for the loader."""
    n = tc.external_tokens(r, 0)
    r.block_ids = list(block_ids[:n // BS])
    tc.after_alloc(r, r.block_ids, n)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if done := tc.finished_loading():
            return n, done
        time.sleep(0.001)
    raise AssertionError("load never finished")


def kinds(events):
    return [(kind, tier, len(h)) for _, kind, h, tier in events.drain()[1]]


def test_evicted_blocks_load_back_bit_for_bit_and_only_under_their_salt(tmp_path):
    tc, events, k, v = tiers(tmp_path)
    r = req("a")
    hashes = r.block_hashes()[:3]
    want = [(k[l][:3].clone(), v[l][:3].clone()) for l in range(L)]
    tc.evicted([0, 1, 2], hashes)
    assert tc.wait_idle() and tc.snapshot.blocks == 3
    assert kinds(events) == [("stored", "host", 3), ("stored", "disk", 3)]
    for c in k + v:
        c.zero_()
    assert tc.external_tokens(req("b", salt="tenant-2"), 0) == 0           # another tenant never hits
    assert tc.external_tokens(req("c", n=9), 4) == 4                        # after a local hit: the rest
    n, done = load(tc, req("a2"), [5, 6, 7])
    assert n == 12 and done == [("a2", True)]                               # the last token's block is computed
    for l in range(L):
        assert torch.equal(k[l][5:8], want[l][0]) and torch.equal(v[l][5:8], want[l][1])
    st = {f["tier"]: f for f in tc.figures()}
    assert st["host"]["hits"] == 3 and st["disk"]["hits"] == 0 and st["host"]["loaded_bytes"] == 3 * BLOCK_BYTES
    assert st["host"]["load_counts"][-1] == 1 and st["disk"]["store_counts"][-1] == 3
    tc.evicted([5], hashes[:1])                                             # held in every tier: no copy
    assert tc.snapshot.skipped == 1 and tc.snapshot.blocks == 3
    tc.close()


@pytest.mark.parametrize("codec,bound", [("int8", 0.01), ("fp8", 0.07)])
def test_a_quantized_host_tier_loads_back_close(codec, bound):
    kv = caches(1)
    tc, _, k, v = tiers(None, codec=codec, kv=kv)
    want = k[0][0].clone()
    r = req("a")
    tc.evicted([0, 1], r.block_hashes()[:2])
    tc.wait_idle()
    k[0].zero_()
    n, done = load(tc, req("a2"), [4, 5])
    assert n == 8 and done == [("a2", True)]
    err = (k[0][4] - want).abs().max() / want.abs().max()
    assert 0 < err < bound                                                  # quantized: close, not equal
    assert tc.figures()[0]["block_bytes"] < BLOCK_BYTES / 3
    tc.close()


def test_capacity_evicts_lru_and_announces_it(tmp_path):
    tc, events, k, v = tiers(tmp_path, host_blocks=2, disk_blocks=2)
    r = req("a", n=17)
    h = r.block_hashes()
    tc.evicted([0, 1], h[:2])
    tc.wait_idle()
    tc.evicted([2], h[2:3])                     # a later batch: the LRU block announced before goes
    tc.wait_idle()
    ev = kinds(events)
    assert ("removed", "host", 1) in ev and ("removed", "disk", 1) in ev
    assert len(list(tmp_path.glob("*.kvb"))) == 2
    assert tc.external_tokens(req("a2", n=17), 0) == 0                      # block 0 went: the chain breaks there
    tc.close()


def test_warm_restart_verifies_the_disk_and_drops_corrupt_files(tmp_path):
    tc, _, k, v = tiers(tmp_path, host_blocks=0)
    r = req("a")
    tc.evicted([0, 1, 2], r.block_hashes()[:3])
    tc.wait_idle()
    want = k[0][:3].clone()
    tc.close()
    files = sorted(tmp_path.glob("*.kvb"))
    victim = tmp_path / f"{r.block_hashes()[2]:016x}.kvb"
    raw = bytearray(victim.read_bytes())
    raw[FILE_HEAD + 100] ^= 0x40                                            # one bit of the payload
    victim.write_bytes(raw)
    cut = tmp_path / f".{r.block_hashes()[0] ^ 1:016x}.kvb.1.tmp"
    cut.write_bytes(b"half")                                               # a write cut short
    (tmp_path / "notes.tmp").write_bytes(b"not ours")                      # not the tier's: it stays
    tc2, events, k2, v2 = tiers(tmp_path, host_blocks=0, kv=caches(7))     # the restarted worker
    assert kinds(events) == [("stored", "disk", 2)] and len(files) == 3
    seq, held = tc2.tier_hashes()
    assert seq == events.seq == 1 and sorted(held["disk"]) == sorted(r.block_hashes()[:2])
    assert not victim.exists() and not cut.exists() and (tmp_path / "notes.tmp").exists()
    assert tc2.figures()[0]["corrupt"] == 1
    n, done = load(tc2, req("a2"), [4, 5, 6])
    assert n == 8 and done == [("a2", True)] and torch.equal(k2[0][4:6], want[:2])
    tc2.close()


def test_one_directory_holds_one_tier_at_a_time(tmp_path):
    """Two tiers in one directory evicted (and scanned away) each other's files, each counting only its
    own against its capacity: the second is refused while the first holds the directory."""
    tc, _, _, _ = tiers(tmp_path, host_blocks=0)
    with pytest.raises(RuntimeError, match="in use by another engine"):
        tiers(tmp_path, host_blocks=0, kv=caches(7))
    tc.close()
    tc2, _, _, _ = tiers(tmp_path, host_blocks=0, kv=caches(7))      # released at close (or at exit)
    tc2.close()


def test_a_restart_keeps_the_disk_tiers_lru_order(tmp_path):
    """The scan ordered files by their first write, and neither a refresh (a held block evicted or computed
    again) nor a hit touched the file: the block used last before a restart was the first evicted after it."""
    tc, _, k, _ = tiers(tmp_path, host_blocks=0, disk_blocks=4)
    hs = [req(f"r{i}", salt=f"s{i}").block_hashes()[0] for i in range(6)]
    for h in hs[:4]:                                    # A, B, C, D stored in that order
        tc.evicted([0], [h])
        assert tc.wait_idle()
        time.sleep(0.01)
    tc.evicted([0], [hs[0]])                            # A again: only its LRU position (and its file's mtime)
    assert tc.wait_idle()
    time.sleep(0.01)
    r = req("hit", salt="s1")                           # B loaded back: a hit
    n, done = load(tc, r, [5])
    assert n == BS and done == [("hit", True)]
    tc.close()
    tc2, _, _, _ = tiers(tmp_path, host_blocks=0, disk_blocks=4, kv=caches(7))
    assert tc2.index["disk"].hashes() == [hs[2], hs[3], hs[0], hs[1]]          # C, D, A, B: least recent first
    tc2.evicted([1], [hs[4]])
    assert tc2.wait_idle() and hs[2] not in tc2.index["disk"] and hs[0] in tc2.index["disk"]
    tc2.close()


def test_a_file_corrupted_after_the_scan_fails_the_load_and_is_dropped(tmp_path):
    tc, events, k, v = tiers(tmp_path, host_blocks=0)
    r = req("a")
    h = r.block_hashes()[:2]
    tc.evicted([0, 1], h)
    tc.wait_idle()
    events.drain()
    p = tmp_path / f"{h[1]:016x}.kvb"
    raw = bytearray(p.read_bytes())
    raw[FILE_HEAD + BLOCK_BYTES - 1] ^= 0x01                                # the payload's last byte
    p.write_bytes(raw)
    n, done = load(tc, req("a2"), [4, 5])
    assert n == 8 and done == [("a2", False)]                               # the scheduler recomputes
    assert not p.exists() and kinds(events) == [("removed", "disk", 1)]
    assert tc.external_tokens(req("a3"), 0) == 4 and tc.figures()[0]["corrupt"] == 1
    tc.close()


def test_a_foreign_layout_on_disk_is_not_loaded(tmp_path):
    tc, _, _, _ = tiers(tmp_path, host_blocks=0)
    tc.evicted([0], req("a").block_hashes()[:1])
    tc.wait_idle()
    tc.close()
    other = Geometry(L, BS, H, D, torch.float32, "int8")
    assert other.fingerprint() != tc.geom.fingerprint()
    tc2, events, _, _ = tiers(tmp_path, host_blocks=0, codec="int8")
    assert kinds(events) == [] and tc2.figures()[0]["corrupt"] == 1
    tc2.close()


def test_a_request_ended_during_its_load_keeps_its_blocks_until_the_loader_lets_go(tmp_path):
    tc, _, _, _ = tiers(None)
    r = req("a")
    tc.evicted([0, 1], r.block_hashes()[:2])
    tc.wait_idle()
    gate, write = threading.Event(), tc.copier.write_blocks
    tc.copier.write_blocks = lambda ids, blocks, after: (gate.wait(10), write(ids, blocks, after))   # held in flight
    r2 = req("a2")
    n = tc.external_tokens(r2, 0)
    r2.block_ids = [4, 5]
    tc.after_alloc(r2, r2.block_ids, n)
    tc.request_aborted("a2")
    assert tc.request_finished("a2", [4, 5]) is True                        # the engine must not free them yet
    assert tc.finished_sending() == []
    gate.set()
    deadline = time.monotonic() + 10
    while not (freed := tc.finished_sending()) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert freed == ["a2"] and tc.finished_loading() == []
    assert tc.request_finished("a2", [4, 5]) is False
    tc.close()


class Recorder(KVConnector):
    """Records the hooks it gets; supplies `n` external tokens."""

    def __init__(self, n=0, saves=False, hold=False):
        self.n, self.saves, self.hold, self.calls = n, saves, hold, []

    def external_tokens(self, request, num_local_tokens):
        return self.n

    def after_alloc(self, request, block_ids, num_external_tokens):
        self.calls.append(("after_alloc", request.request_id, num_external_tokens))

    def request_finished(self, request_id, block_ids):
        self.calls.append(("finished", request_id))
        return self.hold

    def finished_loading(self):
        return [("x", True)] if self.n else []

    def take_loaded(self, request_id):
        return f"inner {request_id}"

    def reservation_failed(self, request_id):
        return None

    def evicted(self, block_ids, hashes):
        self.calls.append(("evicted", block_ids))


def test_multi_connector_routes_loads_to_whoever_promised_them():
    tiers, inner = Recorder(n=8), Recorder(saves=True)
    m = MultiConnector(tiers, inner)
    assert m.saves
    r = req("a")
    assert m.external_tokens(r, 0) == 8
    m.after_alloc(r, [1, 2], 8)                               # the tiers' load
    m.after_alloc(req("remote"), [3, 4, 5], 13)               # a remote prefill's reservation: the inner one's
    assert tiers.calls == [("after_alloc", "a", 8)] and inner.calls == [("after_alloc", "remote", 13)]
    m.evicted([7], [70])
    assert ("evicted", [7]) in tiers.calls and ("evicted", [7]) in inner.calls
    assert m.take_loaded("remote") == "inner remote" and m.finished_loading() == [("x", True)]
    inner.hold = True
    assert m.request_finished("a", [1, 2]) is True and ("finished", "a") in tiers.calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_caches_go_through_pinned_host_memory_and_come_back_exactly(tmp_path):
    k, v = caches(3)
    k, v = [t.cuda() for t in k], [t.cuda() for t in v]
    tc, _, k, v = tiers(tmp_path, kv=(k, v))
    assert tc.host.chunks and all(c.is_pinned() for c in tc.host.chunks)
    r = req("a")
    want = k[1][:3].clone()
    tc.evicted([0, 1, 2], r.block_hashes()[:3])
    k[1][:3].zero_()                                # the step that reuses the blocks, queued after the copy
    assert tc.wait_idle()
    n, done = load(tc, req("a2"), [5, 6, 7])
    assert n == 12 and done == [("a2", True)] and torch.equal(k[1][5:8], want)
    tc.close()


@pytest.mark.parametrize("dtype,kv_cache_dtype", [("float32", "auto"), ("float32", "int8"), ("bfloat16", "fp8")])
def test_workers_report_tier_loads_in_the_unit_the_router_prices_them_in(dtype, kv_cache_dtype):
    """A quantized pool's block is fewer bytes than the model's float K and V; the router prices a tier load as
    blocks x block_size x CostConfig.kv_bytes_per_token (the float dtype's), so the workers count loaded bytes so
    too (LLMEngine.kv_block_model_bytes), not in their pool's bytes: the learned rate is then seconds per block."""
    from types import SimpleNamespace

    from pdcluster.engine.config import DTYPE_BYTES, CacheConfig, ModelConfig
    from pdcluster.engine.llm_engine import LLMEngine
    from pdcluster.router.cost_config import CostConfig
    model = ModelConfig("smollm2", "-", 49152, 576, 1536, 30, 9, 3, 64)
    fake = SimpleNamespace(cfg=SimpleNamespace(model=model, dtype=dtype, cache=CacheConfig(block_size=16),
                                               kv_cache_dtype=kv_cache_dtype))
    priced = CostConfig().with_model(model, DTYPE_BYTES[dtype], 16)
    assert LLMEngine.kv_block_model_bytes(fake) == 16 * priced.kv_bytes_per_token
    if kv_cache_dtype != "auto":
        assert model.kv_bytes_per_block(kv_cache_dtype, DTYPE_BYTES[dtype], 16) < 16 * priced.kv_bytes_per_token


def test_the_router_learns_tier_load_rates_and_resyncs_tiers_from_what_a_worker_reports(tmp_path):
    """tier_load_counters feeds EngineFigures' host/disk counters (the telemetry's learned load rate)
    and cache_snapshot the index resync: both from a real TierConnector after a host load."""
    from pdcluster.kv_transfer.tiers.attach import cache_snapshot, tier_load_counters
    from pdcluster.messages import EngineFigures, WorkerStatus
    from pdcluster.router.placement.load import WorkerLoad
    from pdcluster.router.prefix_index import PrefixIndex
    from pdcluster.router.telemetry import Telemetry
    tc, events, k, v = tiers(tmp_path)
    r = req("a")
    hashes = r.block_hashes()[:3]
    tc.evicted([0, 1, 2], hashes)
    assert tc.wait_idle()
    counters = tier_load_counters(tc, device_block_bytes=1000)
    assert counters == {"host_load_bytes": 0, "host_load_s": 0.0, "disk_load_bytes": 0, "disk_load_s": 0.0}
    load(tc, req("a2"), [5, 6, 7])
    counters = tier_load_counters(tc, device_block_bytes=1000)
    assert counters["host_load_bytes"] == 3000 and counters["host_load_s"] > 0 and counters["disk_load_bytes"] == 0
    tel, w = Telemetry(), WorkerLoad("prefill-0", "prefill")
    prior = tel.perf_of("prefill-0").tier_load["host"].rate
    tel.ingest_status(w, WorkerStatus("prefill-0", "prefill", "i", 1, EngineFigures(**counters)))
    assert tel.perf_of("prefill-0").tier_load["host"].rate == pytest.approx(3000 / counters["host_load_s"])
    assert tel.perf_of("prefill-0").tier_load["host"].rate != prior
    snap = cache_snapshot((7, [11, 12]), tc)
    assert snap.seq == 7 and snap.device == [11, 12]
    assert sorted(snap.host) == sorted(hashes) and sorted(snap.disk) == sorted(hashes)
    assert cache_snapshot((7, [11]), None).host == []
    idx = PrefixIndex()
    idx.add_worker("prefill-0", now=0.0)
    idx.resync("prefill-0", snap.device, seq=snap.seq, now=0.0, lower={"host": snap.host, "disk": snap.disk})
    assert idx.match_tiers(hashes)["prefill-0"] == (0, 3, 0)
    tc.close()


def test_a_peer_pull_reads_blocks_from_host_then_disk_all_or_nothing(tmp_path):
    """TierConnector.read_blocks (a holder serving a pull, kv_transfer/pull.py): host first, disk for
    what the host lost, bit for bit in the block layout; a missing or corrupt block fails the read."""
    tc, events, k, v = tiers(tmp_path, host_blocks=2, disk_blocks=8)
    r = req("a", n=17)
    h = r.block_hashes()[:4]
    want = [torch.cat([k[l][i:i + 1] for l in range(L)] + [v[l][i:i + 1] for l in range(L)]) for i in range(4)]
    tc.evicted([0, 1, 2, 3], h)                            # the host keeps the last 2, the disk all 4
    assert tc.wait_idle()
    for c in k + v:
        c.zero_()                                          # the device copies are gone: only the tiers serve
    blocks, by_tier = tc.read_blocks(h)
    assert by_tier == {"host": 2, "disk": 2}
    assert all(torch.equal(b, w) for b, w in zip(blocks, want))
    figs = {f["tier"]: f for f in tc.figures()}
    assert figs["host"]["served"] == 2 and figs["disk"]["served_bytes"] == 2 * figs["disk"]["block_bytes"]
    assert figs["disk"]["serve_counts"][-1] == 1
    assert all(e.pins == 0 for idx in tc.index.values() for e in idx.entries.values())   # every pin dropped
    assert tc.read_blocks(req("b", salt="t2", n=17).block_hashes()[:4]) is None          # another tenant: nothing
    assert tc.read_blocks(h + [12345]) is None                                           # all or nothing
    p = tmp_path / f"{h[0]:016x}.kvb"
    p.write_bytes(p.read_bytes()[:-1] + b"\x01")          # the file's last byte, padding: must be zero
    events.drain()
    assert tc.read_blocks(h[:1]) is None                   # corrupt: the read fails, the file is dropped
    assert not p.exists() and kinds(events) == [("removed", "disk", 1)]
    assert tc.read_blocks(h[2:]) is not None               # the host's blocks still serve
    tc.close()


class GatedCache:
    """Layer 1's K cache: its writes wait for `gate` (a slow copy), so the test sees wait_layer block."""
    def __init__(self, t):
        self.t, self.gate, self.dtype = t, threading.Event(), t.dtype

    def index_copy_(self, dim, idx, src):
        assert self.gate.wait(10)
        return self.t.index_copy_(dim, idx, src)


def evict_and_wipe(tc, k, v, n):
    """Blocks 0..n-1 of prompt "a" evicted to the tiers, every cache zeroed: the K and V each layer
    must get back."""
    want = [(k[l][:n].clone(), v[l][:n].clone()) for l in range(L)]
    tc.evicted(list(range(n)), req("a").block_hashes()[:n])
    assert tc.wait_idle()
    for c in k + v:
        c.zero_()
    return want


def gated_layer_load(tc, k, v, want):
    """Request a2's load of the 3 blocks of `want` (per layer: K, V) into blocks 5-7, in step, with layer
    1's copy held back: layer 0 is in while wait_layer(1) waits; once let through, layer 1 is in."""
    k1 = k[1]
    gated = tc.k[1] = GatedCache(k1)                        # (tc.k is the list k)
    r2 = req("a2")
    n = tc.external_tokens(r2, 0)
    r2.block_ids = [5, 6, 7]
    tc.after_alloc(r2, r2.block_ids, n)
    assert n == 12 and tc.load_in_step(r2) and tc.loads
    tc.wait_layer(0)
    assert torch.equal(k[0][5:8], want[0][0]) and torch.equal(v[0][5:8], want[0][1])     # layer 0 is in
    waiter = threading.Thread(target=tc.wait_layer, args=(1,))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not k1[5:8].any()              # layer 1 is not: wait_layer waits for it
    gated.gate.set()
    waiter.join(10)
    assert not waiter.is_alive()
    assert torch.equal(k1[5:8], want[1][0]) and torch.equal(v[1][5:8], want[1][1])


def test_a_host_hit_loads_layer_by_layer_and_wait_layer_blocks_until_its_layer_is_in():
    tc, _, k, v = tiers(None, layerwise=True)
    want = evict_and_wipe(tc, k, v, 3)
    gated_layer_load(tc, k, v, want)
    for _ in range(1000):
        if not tc._in_step:
            break
        time.sleep(0.001)
    assert tc.finished_loading() == []                          # an in-step load is never reported
    assert {f["tier"]: f for f in tc.figures()}["host"]["hits"] == 3
    assert all(e.pins == 0 for e in tc.index["host"].entries.values())
    tc.close()


def test_disk_hits_of_a_sending_engine_and_layerwise_off_load_whole_blocks_before_the_step(tmp_path):
    """disk_in_step False (an engine that ships KV as it computes it: a streamed layer cannot be taken
    back if a later one is corrupt): disk hits load whole, checked, before the step."""
    tc, _, k, v = tiers(tmp_path, host_blocks=0, layerwise=True, disk_in_step=False)
    r = req("a")
    tc.evicted([0, 1], r.block_hashes()[:2])
    assert tc.wait_idle()
    r2 = req("a2")
    r2.block_ids = [4, 5]
    tc.after_alloc(r2, r2.block_ids, tc.external_tokens(r2, 0))
    assert not tc.load_in_step(r2) and not tc.loads
    tc.close()
    tc, _, _, _ = tiers(None, layerwise=False)
    tc.evicted([0, 1], r.block_hashes()[:2])
    assert tc.wait_idle()
    n, done = load(tc, req("a3"), [4, 5])
    assert n == 8 and done == [("a3", True)]
    tc.close()


def test_a_reservation_counts_only_host_blocks_as_loadable_in_step(tmp_path):
    """step_tokens (a remote prefill's reservation): host blocks only, from after the local hits; disk
    blocks and layerwise off offer none (those would load after the step starts)."""
    tc, _, _, _ = tiers(tmp_path, host_blocks=2, disk_blocks=8, layerwise=True)
    r = req("a", n=17)
    tc.evicted([0, 1, 2, 3], r.block_hashes()[:4])          # host keeps blocks 2, 3; disk all four
    assert tc.wait_idle()
    assert tc.step_tokens(req("b", n=17), 0) == 0             # block 0 is on disk only
    assert tc.step_tokens(req("c", n=17), 8) == 8             # after 2 local blocks: 2 host blocks
    assert tc.external_tokens(req("d", n=17), 0) == 16        # a local prefill takes the disk ones too
    tc.close()
    tc, _, _, _ = tiers(None, layerwise=False)
    tc.evicted([0, 1], r.block_hashes()[:2])
    assert tc.wait_idle() and tc.step_tokens(req("e", n=17), 0) == 0
    tc.close()


class FailingCache(GatedCache):
    def index_copy_(self, dim, idx, src):
        raise RuntimeError("copy failed")


class Receiving(KVConnector):
    """A transfer connector whose KV is always complete: only the tiers can say otherwise."""

    def take_loaded(self, request_id):
        return None


@pytest.mark.parametrize("fail", [False, True])
def test_a_reservations_host_tier_load_that_fails_is_reported_to_take_loaded(fail):
    """A remote prefill's reservation is never stepped, so an exception in its in-step host load
    cannot go through failed_in_step: start_remote's take_loaded must say the KV is not all there
    (the decode worker aborts it) instead of decoding on blocks missing a layer."""
    tc, _, k, v = tiers(None, layerwise=True)
    want = evict_and_wipe(tc, k, v, 3)
    if fail:
        tc.k[1] = FailingCache(k[1])
    m = MultiConnector(tc, Receiving())
    r = req("res")
    n = m.step_tokens(r, 0)
    m.after_alloc(r, [5, 6, 7], n)
    assert n == 12 and m.load_in_step(r)
    m.wait_loaded("res", 10)
    why = m.take_loaded("res")
    assert m.failed_in_step() == []
    if fail:
        assert why is not None and "failed to load" in why
        assert m.take_loaded("res") is None                     # forgotten once told
    else:
        assert why is None
        assert torch.equal(k[1][5:8], want[1][0]) and torch.equal(v[1][5:8], want[1][1])
    tc.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_host_hit_loads_layer_by_layer_on_the_copy_stream_and_the_compute_stream_waits():
    k, v = caches(4)
    k, v = [t.cuda() for t in k], [t.cuda() for t in v]
    tc, _, k, v = tiers(None, kv=(k, v), layerwise=True)
    want = evict_and_wipe(tc, k, v, 3)
    r2 = req("a2")
    n = tc.external_tokens(r2, 0)
    r2.block_ids = [5, 6, 7]
    tc.after_alloc(r2, r2.block_ids, n)
    assert n == 12 and tc.load_in_step(r2)
    got = []
    for layer in range(L):
        tc.wait_layer(layer)                        # the current stream now waits on the layer's copy event
        got.append((k[layer][5:8].clone(), v[layer][5:8].clone()))     # ordered after it on this stream
    torch.cuda.synchronize()
    assert all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]) for g, w in zip(got, want))
    tc.close()
