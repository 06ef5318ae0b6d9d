"""TierConnector when things go wrong: a full or failing disk, a failed copy-out, a lagging writer, a
block found corrupt while another load pins it, read errors, a restart on other weights, a scan past
an unremovable entry, a pull whose read or transport fails. Small CPU caches, no model."""
import errno
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from pdcluster.engine import weights_id
from pdcluster.engine.block_events import BlockEventLog
from pdcluster.kv_transfer import pull
from pdcluster.kv_transfer.pull_stats import PullStats
from pdcluster.kv_transfer.tiers import TierConfig, TierConnector
from pdcluster.kv_transfer.tiers import disk as disk_mod
from pdcluster.kv_transfer.tiers.block_format import Geometry
from pdcluster.kv_transfer.tiers.disk import DiskStore
from pdcluster.messages import PullOrder

from tests.unit.test_kv_tiers import BLOCK_BYTES, BS, FILE_BYTES, caches, load, req


def make(tmp_path=None, host_blocks=16, disk_blocks=16, layerwise=False, **kw):
    """layerwise False: loads are whole-block ones, reported by finished_loading."""
    events = BlockEventLog()
    disk = dict(disk_dir=str(tmp_path), disk_bytes=disk_blocks * FILE_BYTES) if tmp_path else {}
    tc = TierConnector(TierConfig(host_bytes=host_blocks * BLOCK_BYTES, layerwise=layerwise, **disk, **kw), events)
    tc.register_caches(*caches())
    assert tc.wait_idle()
    return tc, events


def replay(events, tier):
    """The router's view of `tier` after applying every event in order."""
    held = set()
    for _, kind, hashes, t in events.drain()[1]:
        if t == tier:
            (held.update if kind == "stored" else held.difference_update)(hashes)
    return held


def held(tc, tier):
    idx = tc.index[tier]
    return {h for h in idx.hashes() if idx.get(h).ready}


def test_a_batch_larger_than_the_tier_announces_only_what_the_tier_still_holds():
    tc, events = make(host_blocks=2)
    hs = req("a", n=17).block_hashes()[:4]
    tc.evicted([0, 1, 2, 3], hs)                        # blocks 0 and 1 are stored, then evicted by 2 and 3
    assert tc.wait_idle()
    assert held(tc, "host") == set(hs[2:])
    assert replay(events, "host") == set(hs[2:])        # no "stored" after "removed" for 0 and 1


def test_a_block_held_before_a_batch_that_evicts_stores_and_evicts_it_again_is_announced_removed(tmp_path):
    """Per tier the events are each block's net change over the batch: held before (host only: its disk write
    failed), then within one batch evicted, stored again and evicted again by its batch-mates: "removed"."""
    tc, events = make(tmp_path, host_blocks=3, disk_blocks=16)
    hs = req("a", n=8 * BS + 1).block_hashes()
    h0, rest = hs[0], hs[1:7]
    real_write = tc.disk.write

    def no_room_for_h0(h, *a):
        if h == h0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(h, *a)
    tc.disk.write = no_room_for_h0
    tc.evicted([0], [h0])
    assert tc.wait_idle()
    tc.disk.write = real_write
    router = {"host": set(), "disk": set()}
    for _, kind, hashes, tier in events.drain()[1]:
        (router[tier].update if kind == "stored" else router[tier].difference_update)(hashes)
    assert router == {"host": {h0}, "disk": set()}
    tc.evicted(list(range(1, 8)), rest[:3] + [h0] + rest[3:])
    assert tc.wait_idle()
    for _, kind, hashes, tier in events.drain()[1]:
        (router[tier].update if kind == "stored" else router[tier].difference_update)(hashes)
    assert router == {"host": held(tc, "host"), "disk": held(tc, "disk")} and h0 not in router["host"]


def test_a_full_disk_leaves_no_file_behind_and_the_host_tier_takes_the_whole_batch(tmp_path, monkeypatch):
    tc, events = make(tmp_path, host_blocks=8, disk_blocks=8)
    first = req("a", n=9).block_hashes()[:2]
    tc.evicted([0, 1], first)
    assert tc.wait_idle()
    monkeypatch.setattr(disk_mod.os, "write", lambda fd, b: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    hs = req("b", salt="t2", n=17).block_hashes()[:4]  # four new blocks
    tc.evicted([2, 3, 4, 5], hs)
    assert tc.wait_idle()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    assert set(hs) <= held(tc, "host")                  # the disk's failures did not stop the batch
    assert held(tc, "disk") == set(first)
    figs = {f["tier"]: f for f in tc.figures()}
    assert figs["disk"]["store_failures"] == 4 and figs["host"]["store_failures"] == 0
    assert replay(events, "disk") == set(first)


def test_a_failed_copy_out_drops_its_blocks_and_leaves_nothing_pending():
    tc, _ = make()
    hs = req("a", n=17).block_hashes()[:4]
    real = tc.copier.copy_out
    tc.copier.copy_out = lambda *a: (_ for _ in ()).throw(RuntimeError("out of pinned memory"))
    tc.evicted([0, 1, 2, 3], hs)                        # does not raise into the device pool's eviction
    assert tc._pending == set() and tc._queued_blocks == 0
    assert tc.snapshot.dropped == 4 and {f["tier"]: f["dropped"] for f in tc.figures()} == {"host": 4}
    tc.copier.copy_out = real
    tc.evicted([0, 1, 2, 3], hs)                        # the same blocks, evicted again: stored now
    assert tc.wait_idle() and held(tc, "host") == set(hs)


def test_the_writer_queue_is_bounded_in_bytes_and_keeps_what_fits(tmp_path):
    staged = BLOCK_BYTES                                # one block's float32 staging copy
    tc, _ = make(tmp_path, host_blocks=0, disk_blocks=16, queue_bytes=3 * staged)
    assert tc.queue_limit == 3
    gate, real = threading.Event(), tc.disk.write
    tc.disk.write = lambda *a: (gate.wait(10), real(*a))[1]     # a disk slower than the evictions
    hs = req("a", n=21).block_hashes()[:5]
    tc.evicted([0, 1, 2, 3, 4], hs)
    assert tc._queued_blocks == 3 and tc.snapshot.dropped == 2
    gate.set()
    assert tc.wait_idle()
    assert held(tc, "disk") == set(hs[:3])              # the batch's head, the prefix's first blocks


def test_a_corrupt_block_another_load_pins_leaves_when_that_load_ends(tmp_path):
    tc, events = make(tmp_path, host_blocks=0, disk_blocks=8)
    hs = req("w", n=9).block_hashes()[:2]
    tc.evicted([0, 1], hs)
    assert tc.wait_idle()
    events.drain()
    p = tc.disk.path(hs[0])
    raw = bytearray(p.read_bytes())
    raw[tc.disk.header_bytes + 10] ^= 0xFF
    p.write_bytes(raw)
    gate, real = threading.Event(), tc.disk.read
    tc.disk.read = lambda h: (gate.wait(10), real(h))[1]
    for rid, ids in (("a", [4, 5]), ("b", [6, 7])):     # both pin the blocks; b is cancelled before its read
        r = req(rid, n=9)
        n = tc.external_tokens(r, 0)
        r.block_ids = ids[:n // BS]
        tc.after_alloc(r, r.block_ids, n)
    tc.request_aborted("b")
    gate.set()
    tc.wait_loaded("a", 10)
    tc.wait_loaded("b", 10)
    deadline = time.monotonic() + 10
    while tc._loads and time.monotonic() < deadline:
        time.sleep(0.005)
    assert hs[0] not in tc.index["disk"]                # gone, not an unready entry forever
    assert ("removed", [hs[0]], "disk") in [(k, h, t) for _, k, h, t in events.drain()[1]]
    tc.disk.read = real
    tc.evicted([0], [hs[0]])                            # the intact block, evicted again: stored again
    assert tc.wait_idle() and hs[0] in held(tc, "disk")


def test_one_corrupt_block_two_readers_found_counts_once(tmp_path):
    """Two pulls pinned one bad block before either read it: each counted it corrupt (2 for 1 block)."""
    tc, _ = make(tmp_path, host_blocks=0, disk_blocks=8)
    h = req("w", n=9).block_hashes()[0]
    tc.evicted([0], [h])
    assert tc.wait_idle()
    p = tc.disk.path(h)
    raw = bytearray(p.read_bytes())
    raw[tc.disk.header_bytes + 10] ^= 0xFF
    p.write_bytes(raw)
    both, real = threading.Barrier(2), tc.disk.read
    tc.disk.read = lambda x: (both.wait(10), real(x))[1]              # both pinned before either reads
    got = []
    readers = [threading.Thread(target=lambda: got.append(tc.read_blocks([h]))) for _ in range(2)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(10)
    assert got == [None, None] and h not in tc.index["disk"]
    assert {f["tier"]: f for f in tc.figures()}["disk"]["corrupt"] == 1
    tc.close()


@pytest.mark.parametrize("layerwise", [False, True])
def test_an_unreadable_file_is_a_bad_block_for_loads_and_pulls(tmp_path, monkeypatch, layerwise):
    tc, _ = make(tmp_path, host_blocks=0, disk_blocks=8, layerwise=layerwise)
    hs = req("w", n=13).block_hashes()[:3]
    tc.evicted([0, 1, 2], hs)
    assert tc.wait_idle()
    real_open = disk_mod._open_file

    def eio(path):
        if str(path).endswith(f"{hs[0]:016x}.kvb"):
            raise OSError(errno.EIO, "Input/output error")
        return real_open(path)
    monkeypatch.setattr(disk_mod, "_open_file", eio)
    if layerwise:                                       # loaded in the step: the failure names the request
        r = req("a", n=13)
        n = tc.external_tokens(r, 0)
        r.block_ids = [4, 5, 6][:n // BS]
        tc.after_alloc(r, r.block_ids, n)
        assert tc.load_in_step(r)
        tc.wait_loaded("a", 10)
        assert n == 3 * BS and tc.failed_in_step() == ["a"]
    else:
        n, done = load(tc, req("a", n=13), [4, 5, 6])
        assert n == 3 * BS and done == [("a", False)]   # the load fails (recompute) ...
    assert hs[0] not in tc.index["disk"] and not tc.disk.path(hs[0]).exists()    # ... and the block is dropped
    f = {x["tier"]: x for x in tc.figures()}["disk"]
    assert f["load_failures"] == 1 and f["corrupt"] == 1
    assert tc.external_tokens(req("b", n=13), 0) == 0   # never offered again
    monkeypatch.setattr(disk_mod, "_open_file", lambda path: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    assert tc.read_blocks(hs[1:2]) is None              # a peer's pull: refused, not raised
    assert hs[1] not in tc.index["disk"]


def test_a_restart_on_other_weights_finds_none_of_the_old_blocks(tmp_path):
    k, _ = caches()
    old = DiskStore(tmp_path, Geometry.of(k, "none", model="weights-a/float32/none"))
    old.write(0xABC, torch.randn(Geometry.of(k, "none").shape), None)
    same = DiskStore(tmp_path, Geometry.of(k, "none", model="weights-a/float32/none"))
    assert same.scan() == ([0xABC], 0)
    other = DiskStore(tmp_path, Geometry.of(k, "none", model="weights-b/float32/none"))
    assert other.scan() == ([], 1) and not list(Path(tmp_path).glob("*.kvb"))


def test_weights_id_names_the_bytes_not_the_path(tmp_path):
    a = tmp_path / "a.gguf"
    a.write_bytes(os.urandom(3 * 2**20))
    b = tmp_path / "sub" / "b.gguf"
    b.parent.mkdir()
    b.write_bytes(a.read_bytes())
    assert weights_id.weights_id(a) != weights_id.weights_id(b)          # the name is part of it ...
    c = tmp_path / "sub2" / "a.gguf"
    c.parent.mkdir()
    c.write_bytes(a.read_bytes())
    assert weights_id.weights_id(a) == weights_id.weights_id(c)          # ... the location and mtime are not
    raw = bytearray(a.read_bytes())
    raw[8 * (len(raw) - weights_id.CHUNK) // (weights_id.SAMPLES - 1) + 5] ^= 1     # a byte of sample 8
    c.write_bytes(raw)
    assert weights_id.weights_id(a) != weights_id.weights_id(c)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(a.read_bytes())
    (folder / "config.json").write_text("{}")
    assert [p.name for p in weights_id.weight_files(folder)] == ["model.safetensors"]


def test_a_scan_goes_on_past_an_entry_it_cannot_remove(tmp_path):
    k, _ = caches()
    g = Geometry.of(k, "none")
    store = DiskStore(tmp_path, g)
    for h in (1, 2, 3):
        store.write(h, torch.randn(g.shape), None)
    (tmp_path / f"{4:016x}.kvb").mkdir()                # not a file: unreadable, and unlink fails
    good, bad = store.scan()
    assert sorted(good) == [1, 2, 3] and bad == 1


class _NoDevice:
    """The holder's engine thread holding none of the blocks on its device (tier-only pulls)."""
    engine = None

    def run(self, fn):
        return [], None


class _BrokenTransport:
    def open(self, *a):
        raise RuntimeError("connection setup failed")


def test_a_pull_whose_read_or_transport_fails_is_a_failed_result_not_an_exception(tmp_path, monkeypatch):
    tc, _ = make(tmp_path, host_blocks=0, disk_blocks=8)
    hs = req("w", n=9).block_hashes()[:2]
    tc.evicted([0, 1], hs)
    assert tc.wait_idle()
    order = PullOrder("r", hs, "127.0.0.1:1", "puller", [0, 1])
    stats = PullStats()
    res = pull.serve_pull(_NoDevice(), _BrokenTransport(), order, 5.0, tc, stats)
    assert not res.ok and "connection setup failed" in res.reason
    monkeypatch.setattr(tc, "read_blocks", lambda hashes: (_ for _ in ()).throw(MemoryError()))
    res = pull.serve_pull(_NoDevice(), _BrokenTransport(), order, 5.0, tc, stats)
    assert not res.ok and "MemoryError" in res.reason
    assert stats.as_dict()["serve_failures"] == 2


def test_a_pull_order_naming_a_block_twice_or_odd_ids_is_refused_before_any_read(tmp_path):
    tc, _ = make(tmp_path, host_blocks=0, disk_blocks=8)
    hs = req("w", n=9).block_hashes()[:2]
    tc.evicted([0, 1], hs)
    assert tc.wait_idle()
    for hashes, dst in (([hs[0], hs[0]], [0, 1]), ([hs[0], str(hs[1])], [0, 1]), (hs, [0, 1.0]), (hs, [0, -1])):
        res = pull.serve_pull(_NoDevice(), _BrokenTransport(), PullOrder("r", hashes, "127.0.0.1:1", "p", dst), 5.0,
                              tc)
        assert not res.ok and "each block once" in res.reason
    assert all(tc.index["disk"].get(h).pins == 0 for h in hs)


def test_a_corrupt_block_read_twice_for_a_pull_leaves_no_pin(tmp_path):
    """read_blocks pins each named entry; a hash named twice holds two pins, and when its file is corrupt both go
    (the entry leaves the index) rather than one staying forever."""
    tc, _ = make(tmp_path, host_blocks=0, disk_blocks=8)
    hs = req("w", n=9).block_hashes()[:2]
    tc.evicted([0, 1], hs)
    assert tc.wait_idle()
    path = tc.disk.path(hs[0])
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert tc.read_blocks([hs[0], hs[0]]) is None
    assert hs[0] not in tc.index["disk"] and tc.index["disk"].get(hs[1]).pins == 0


def test_attach_tiers_names_the_engines_weights_and_dtype_in_the_disk_tier(tmp_path):
    from types import SimpleNamespace

    from pdcluster.engine.config import CacheConfig
    from pdcluster.kv_transfer.tiers.attach import attach_tiers
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(os.urandom(2**20))
    cache = CacheConfig(disk_cache_dir=str(tmp_path / "d"), disk_cache_gb=0.01)

    def engine(dtype):
        cfg = SimpleNamespace(model=SimpleNamespace(path=str(gguf)), dtype=dtype, quantization="none", cache=cache)
        return SimpleNamespace(cfg=cfg, block_events=lambda: None, connector=None)
    a, b = attach_tiers(engine("float32"), worker_id="w0"), attach_tiers(engine("bfloat16"), worker_id="w0")
    assert a.cfg.model.startswith(f"{weights_id.weights_id(gguf)}/float32/none/")
    assert b.cfg.model != a.cfg.model and a.cfg.disk_dir.endswith("w0")


def test_the_kv_identity_names_the_config_fields_k_and_v_depend_on(tmp_path):
    """The same weight files under another rope_theta or rope_scaling (an HF folder's config.json edited) make other
    K: a restart must not read the old blocks back."""
    from dataclasses import replace
    from types import SimpleNamespace

    from pdcluster.engine.config import ModelConfig
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(os.urandom(2**16))
    m = ModelConfig("m", str(gguf), 100, 64, 128, 2, 4, 2, 16)

    def ident(model):
        return weights_id.kv_identity(SimpleNamespace(model=model, dtype="float32", quantization="none"))
    base = ident(m)
    assert ident(replace(m, name="other name")) == base and ident(replace(m, max_position_embeddings=4096)) == base
    for change in (dict(rope_theta=500000.0), dict(rope_scaling=(("rope_type", "yarn"), ("factor", 4.0))),
                   dict(rms_norm_eps=1e-6), dict(attention_bias=True)):
        assert ident(replace(m, **change)) != base, change


def test_the_host_pool_comes_in_power_of_two_chunks_and_every_slot_round_trips(monkeypatch):
    """Pinned allocations are rounded up to a power of two (torch's caching host allocator), so the
    pool is allocated in chunks of at most CHUNK_BYTES: here 3 slots a chunk, 7 slots in all."""
    from pdcluster.kv_transfer.tiers import host as host_mod
    k, _ = caches()
    g = Geometry.of(k, "none")
    monkeypatch.setattr(host_mod, "CHUNK_BYTES", 3 * g.data_bytes + 1)
    pool = host_mod.HostPool(g, 7)
    assert [c.shape[0] for c in pool.chunks] == [3, 3, 1] and pool.per_chunk == 3
    blocks = [torch.randn(g.shape) for _ in range(7)]
    for s, b in enumerate(blocks):
        pool.put(s, b, None)
    assert all(torch.equal(pool.get(s), b) for s, b in enumerate(blocks))
    assert torch.equal(pool.chunks[2][0], blocks[6])
    with pytest.raises(IndexError):
        pool.get(7)


def test_a_reservation_whose_host_block_went_meanwhile_loads_nothing(tmp_path):
    """add_remote: step_tokens offered host blocks, then the writer evicted one before after_alloc. The
    blocks then cross from the prefill worker (load_in_step False), so the tiers must not also load
    them (a disk copy into blocks the transfer writes): no job, no pin, nothing reported."""
    tc, _ = make(tmp_path, host_blocks=2, disk_blocks=8, layerwise=True)
    hs = req("w", n=13).block_hashes()[:3]
    tc.evicted([0, 1], hs[:2])
    assert tc.wait_idle()
    r = req("res", n=13)
    assert tc.step_tokens(r, 0) == 2 * BS
    tc.evicted([2], hs[2:3])                            # the host tier's LRU (block 0) goes; disk keeps it
    assert tc.wait_idle() and hs[0] not in tc.index["host"] and hs[0] in held(tc, "disk")
    tc.after_alloc(r, [5, 6], 2 * BS)
    assert not tc.load_in_step(r) and tc._loads == {}
    assert all(tc.index[t].get(h).pins == 0 for t in tc.index for h in hs if h in tc.index[t])
    time.sleep(0.05)
    assert tc.finished_loading() == [] and tc.failed_in_step() == [] and tc.reservation_failed("res") is None


def test_the_writer_thread_runs_at_a_lower_cpu_priority_than_the_engine():
    tc, _ = make()
    writer = next(t for t in tc._threads if t.name == "kv-tier-writer")
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert os.getpriority(os.PRIO_PROCESS, writer.native_id) == min(mine + 10, 19)
    loader = next(t for t in tc._threads if t.name == "kv-tier-layer-loader")    # on a step's path: as the engine
    assert os.getpriority(os.PRIO_PROCESS, loader.native_id) == mine


class LockCheckingLog(BlockEventLog):
    """An event log that notes, per event, whether the tier's lock was held when it was recorded."""
    def __init__(self):
        super().__init__()
        self.tc, self.unlocked = None, []

    def record(self, kind, hashes, tier="device"):
        if self.tc is not None and not self.tc._lock.locked():
            self.unlocked.append((kind, tier))
        super().record(kind, hashes, tier)


def test_a_block_found_corrupt_while_its_write_batch_runs_is_not_announced_stored_after(tmp_path):
    """A pull reads a disk block found corrupt (dropped, "removed") while the writer's batch that stored
    it is still writing the next blocks. Before, the batch announced "stored" for it afterwards, so the
    router counted a disk hit the worker no longer had, with no sequence gap to correct it. Every tier
    event is recorded under the tier's lock, so the events' order is the index's."""
    events = LockCheckingLog()
    tc = TierConnector(TierConfig(disk_dir=str(tmp_path), disk_bytes=16 * FILE_BYTES, layerwise=False), events)
    tc.register_caches(*caches())
    assert tc.wait_idle()
    events.tc = tc
    hs = req("a", n=4 * BS + 1).block_hashes()[:3]
    real, seen = tc.disk.write, []

    def write(h, *a):
        if h == hs[1]:                                  # hs[0] is written and ready, the batch's events not out
            p = tc.disk.path(hs[0])
            raw = bytearray(p.read_bytes())
            raw[tc.disk.header_bytes + 10] ^= 0xFF
            p.write_bytes(raw)
            t = threading.Thread(target=lambda: seen.append(tc.read_blocks([hs[0]])))   # a pull's read
            t.start()
            t.join()
        return real(h, *a)
    tc.disk.write = write
    tc.evicted([0, 1, 2], hs)
    assert tc.wait_idle()
    assert seen == [None] and hs[0] not in tc.index["disk"]     # the pull found it corrupt: dropped
    assert replay(events, "disk") == held(tc, "disk") == set(hs[1:])
    assert events.unlocked == []
    tc.close()


@pytest.mark.parametrize("fail", [False, True])
def test_an_in_step_load_that_ends_before_load_in_step_is_asked_still_counts_as_in_step(fail, monkeypatch):
    """The loader thread does not wait for the step: it may copy every layer (or fail) before the engine
    thread asks load_in_step. That answered from the live job, so it said False: the scheduler parked the
    request in `loading`, which only finished_loading releases, and that never names an in-step job: the
    request waited for good. The answer is after_alloc's choice now. Real Scheduler and MultiConnector."""
    from pdcluster.engine.config import SchedulerConfig
    from pdcluster.engine.kv_cache_manager import KVCacheManager
    from pdcluster.engine.kv_connector import KVConnector
    from pdcluster.engine.request import Status
    from pdcluster.engine.scheduler import Scheduler
    from pdcluster.kv_transfer.tiers import MultiConnector
    from tests.unit.test_kv_tiers import NB, tiers

    tc, _events, _k, _v = tiers(None, host_blocks=16, layerwise=True)
    try:
        tc.evicted([0, 1, 2], req("a").block_hashes()[:3])
        assert tc.wait_idle()                           # the prompt's first 3 blocks are in the host tier
        if fail:
            monkeypatch.setattr(tc, "_load_layers", lambda job: False)
        conn = MultiConnector(tc, KVConnector())
        sched = Scheduler(SchedulerConfig(), KVCacheManager(NB, BS), 64, conn)
        orig = tc.after_alloc

        def after_alloc(request, block_ids, n):          # the engine thread loses the CPU after queueing the load
            orig(request, block_ids, n)
            tc.wait_loaded(request.request_id, 10.0)
        monkeypatch.setattr(tc, "after_alloc", after_alloc)
        r = req("a2")
        sched.add(r)
        batch = sched.schedule()
        assert r.request_id not in sched.loading and r.status == Status.RUNNING
        assert [x.request_id for x in batch.reqs] == [r.request_id] and r.num_computed_tokens == 3 * BS
        assert conn.failed_in_step() == ([r.request_id] if fail else [])    # a failure: recomputed, not lost
        assert not tc._in_step_ids and conn.finished_loading() == []
    finally:
        tc.close()


def test_a_block_file_under_another_spelling_of_its_hash_is_not_announced_on_restart(tmp_path):
    """int(name, 16) also takes "0x..", "_"-separated or upper-case names: such a file passed the header
    check and was announced, yet loads read path(h), another name (a miss), and it never left the disk."""
    from tests.unit.test_kv_tiers import tiers
    tc, _, _, _ = tiers(tmp_path, host_blocks=0)
    hs = req("a").block_hashes()[:2]
    tc.evicted([0, 1], hs)
    assert tc.wait_idle()
    tc.close()
    odd = tmp_path / f"0x{hs[1]:016x}.kvb"
    (tmp_path / f"{hs[1]:016x}.kvb").rename(odd)
    tc2, events, _, _ = tiers(tmp_path, host_blocks=0)
    try:
        assert tc2.tier_hashes()[1]["disk"] == [hs[0]] and not odd.exists()
        assert tc2.figures()[0]["corrupt"] == 1 and sorted(p.name for p in tmp_path.glob("*.kvb")) == [
            f"{hs[0]:016x}.kvb"]
    finally:
        tc2.close()


def test_a_resync_snapshot_waits_for_a_write_batch_so_snapshot_and_events_end_as_the_tier():
    """A batch's events are its net change, sent at its end. A snapshot taken in the middle listed a block the
    batch had stored and then evicted: the net events never named it, so the router kept it for good."""
    from tests.unit.test_kv_tiers import tiers
    tc, events, _, _ = tiers(None, host_blocks=2)               # 2 host slots: the batch's third block evicts one
    events.drain()
    hs = req("a", n=17).block_hashes()[:3]
    snap, puts = {}, []
    put = tc.host.put

    def resync():
        snap["seq"], snap["tiers"] = tc.tier_hashes()

    def slow_put(slot, data, scales):
        puts.append(slot)
        if len(puts) == 2:                                      # the first block stored, the second being written
            t = snap["thread"] = threading.Thread(target=resync)
            t.start()
            t.join(0.3)                                         # the router's resync, on a worker RPC thread
        return put(slot, data, scales)

    try:
        tc.host.put = slow_put
        tc.evicted([0, 1, 2], hs)
        assert tc.wait_idle()
        snap["thread"].join(10)
        view = set(snap["tiers"]["host"])
        for seq, kind, got, tier in events.drain()[1]:
            if seq > snap["seq"] and tier == "host":
                view = view | set(got) if kind == "stored" else view - set(got)
        held = set(tc.tier_hashes()[1]["host"])
        assert len(puts) == 3 and len(held) == 2 and view == held
    finally:
        tc.close()
