"""A TierConnector's disk directory over its life: what the start-up scan opens, when the directory's lock
is released (close with a busy writer, a forked child, a failed registration), and an engine used after
its tiers closed. Small CPU caches, no model (but the last test)."""
import gc
import os
import signal
import threading
import time

import pytest

from pdcluster.engine.block_events import BlockEventLog
from pdcluster.engine.kv_connector import KVConnector
from pdcluster.kv_transfer.tiers import TierConfig, TierConnector
from pdcluster.kv_transfer.tiers.multi import MultiConnector

from tests.unit.test_kv_tiers import FILE_BYTES, caches, load, req

pytestmark = pytest.mark.timeout(60)


def disk_tier(tmp_path, seed=0, wait=True, **kw) -> TierConnector:
    tc = TierConnector(TierConfig(disk_dir=str(tmp_path), disk_bytes=16 * FILE_BYTES, layerwise=False, **kw),
                       BlockEventLog())
    tc.register_caches(*caches(seed))
    if wait:
        assert tc.wait_idle()
    return tc


def test_a_fifo_named_like_a_block_file_is_dropped_not_waited_on(tmp_path):
    """The scan at start opened every *.kvb with open(): a FIFO blocked it for good (the tier never ready,
    every store queued behind it). Files are opened non-blocking, not following links, regular ones only."""
    fifo = tmp_path / f"{0x1234:016x}.kvb"
    os.mkfifo(fifo)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x" * FILE_BYTES)
    link = tmp_path / f"{0x5678:016x}.kvb"
    link.symlink_to(target)
    tc = disk_tier(tmp_path, wait=False)
    try:
        assert tc.wait_idle(timeout_s=5.0) and tc.ready.is_set()
        assert not fifo.exists() and not link.is_symlink() and target.exists()   # the link went, not its target
        assert {f["tier"]: f for f in tc.figures()}["disk"]["corrupt"] == 2
    finally:
        if fifo.exists():                       # (before the fix: unblock the scan's open)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        tc.close()


def test_close_keeps_the_directory_locked_while_its_writer_still_writes(tmp_path, monkeypatch):
    """close() joined the threads for 10 s, then released the lock anyway: a writer still storing went on
    writing into a directory a second engine had locked and scanned meanwhile (files its index never knew).
    Now the lock goes when the writer is done."""
    monkeypatch.setattr(TierConnector, "JOIN_S", 0.2)
    tc = disk_tier(tmp_path)
    gate, write = threading.Event(), tc.disk.write
    tc.disk.write = lambda h, data, scales: gate.wait(30) and write(h, data, scales)
    tc.evicted([0, 1, 2], req("a").block_hashes()[:3])
    tc.close()
    with pytest.raises(RuntimeError, match="in use by another engine"):
        disk_tier(tmp_path, seed=7)
    gate.set()
    deadline = time.monotonic() + 10
    while True:                                 # the writer stores the three blocks, then lets go
        try:
            tc2 = disk_tier(tmp_path, seed=7)
            break
        except RuntimeError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert len(tc2.index["disk"]) == 3          # the second engine found what the first one wrote
    tc2.close()


def test_a_forked_child_does_not_keep_the_directory_locked(tmp_path):
    """A flock belongs to the open file description, which fork shares: a child forked while the tier was up
    (a multiprocessing pool) kept the directory locked after the engine closed. The child drops its copy."""
    tc = disk_tier(tmp_path)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                # the child: unrelated work outliving the engine
        os.write(w, b"+")                       # (os.fork returned here: the at-fork hooks have run)
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(r, 1) == b"+"
        tc.close()
        disk_tier(tmp_path, seed=7).close()     # before: "in use by another engine"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)


def test_a_failed_registration_leaves_the_directory_unlocked(tmp_path):
    """register_caches took the lock, then a bad setting (or the inner connector beside the tiers) raised:
    nothing could release it, and a corrected retry in the same process was refused."""
    bad = TierConnector(TierConfig(disk_dir=str(tmp_path), disk_bytes=16 * FILE_BYTES, protected_fraction=1.5))
    with pytest.raises(ValueError, match="protected_fraction"):
        bad.register_caches(*caches())

    class Failing(KVConnector):
        def register_caches(self, k, v):
            raise RuntimeError("the inner connector failed")
    tiers = TierConnector(TierConfig(disk_dir=str(tmp_path), disk_bytes=16 * FILE_BYTES))
    started = []
    real_start = threading.Thread.start

    def start(t):                   # the tiers' threads, seen as they start (close() forgets its list)
        started.append(t)
        real_start(t)
    threading.Thread.start = start
    try:
        with pytest.raises(RuntimeError, match="inner connector"):
            MultiConnector(tiers, Failing()).register_caches(*caches())
    finally:
        threading.Thread.start = real_start
    assert started and not [t for t in started if t.is_alive()]      # closed: its threads ended
    disk_tier(tmp_path, seed=7).close()


def test_a_dropped_store_releases_its_lock():
    """A DiskStore locked and dropped without unlock() (its connector never closed) frees the directory."""
    import tempfile

    from pdcluster.kv_transfer.tiers.block_format import Geometry
    from pdcluster.kv_transfer.tiers.disk import DiskStore
    k, v = caches()
    with tempfile.TemporaryDirectory() as d:
        DiskStore(d, Geometry.of(k, "none", "")).lock()
        gc.collect()
        store = DiskStore(d, Geometry.of(k, "none", ""))
        store.lock()
        store.unlock()


def test_loads_after_close_find_nothing_below(tmp_path):
    """After close() the engine runs as without tiers: before, a prompt that hit a lower tier pinned its
    blocks and queued a load no thread would run (whole-block loads: the engine waited for good)."""
    tc = disk_tier(tmp_path)
    hs = req("a").block_hashes()[:3]
    tc.evicted([0, 1, 2], hs)
    assert tc.wait_idle() and tc.external_tokens(req("b"), 0) == 12
    tc.close()
    assert tc.external_tokens(req("c"), 0) == 0 and not tc.loads
    assert tc.read_blocks(hs) is None           # a peer's pull: nothing to serve
    tc.evicted([0], hs[:1])                     # an eviction: no copy, no job
    tc.close()                                  # idempotent


def test_an_offline_llm_generates_after_close(tmp_path):
    """LLM.close() then generate(): the prompt is computed, not waited on."""
    from pdcluster.engine import SamplingParams
    from pdcluster.engine.llm import LLM
    llm = LLM(kv_cache_memory=16 * 2**20, host_cache_gb=0.05, tier_layerwise=False, num_threads=1)
    prompt = "Explain in three short sentences why the sky looks blue during the day and red at sunset, please."
    sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    first = llm.generate(prompt, sp)[0].outputs[0].token_ids
    pool = llm.engine.kv.pool
    pool.free(pool.allocate(pool.num_free_blocks))      # the prompt leaves the device pool: only the host holds it
    assert llm.tiers.wait_idle()
    llm.close()
    out = []
    t = threading.Thread(target=lambda: out.append(llm.generate(prompt, sp)[0].outputs[0].token_ids), daemon=True)
    t.start()
    t.join(30)
    assert out == [first]
