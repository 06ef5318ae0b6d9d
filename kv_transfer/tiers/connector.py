"""TierConnector: the engine's KV connector for a worker's host-memory and disk cache tiers.

    device pool (engine BlockPool) --computed / evicted--> writer thread --> host pool (HostPool) + disk (DiskStore)
    device pool <--loader thread <-- host / disk   (a prompt whose next blocks a lower tier holds)

Write-through (default) and write-behind. When the device pool publishes computed blocks
(`computed`, with `write_through`) or evicts cached ones (`evicted`, on the engine thread, before the
step that reuses them runs), their KV is copied into a staging tensor: the only work on the step's
path (timed in `snapshot`). Blocks that every tier already holds are only touched in the LRU, no copy:
a block written through costs no copy when it is evicted, unless the host tier dropped it meanwhile.
Write-through is what makes a restart warm: the LRU evicts a request's tail first, so the head of a
hot prefix (a system prompt) may never leave the device pool, and evicted-only it was never on disk.
Its price: the host tier holds copies of blocks the device pool still has (inclusive, as SGLang
HiCache's write_through). `write_through=False` (--kv-tier-write-back) stores evicted blocks only.
The writer thread encodes them (codec none | int8 | fp8) and stores each into the host pool and the
disk directory (both: the disk holds every block the host pool does, for a warm restart). If more
than `queue_blocks` blocks (or `queue_bytes` of staging copies) wait, new ones are dropped rather
than slowing steps (counted: `dropped`). A GPU host copies to
pinned staging memory asynchronously; the writer waits for the copy.

Load-back. `external_tokens` counts the request's next blocks (after its device prefix hits) that a
lower tier holds, ready; the scheduler allocates blocks for them, `after_alloc` pins the entries and
queues a load job for the loader thread. Two ways:
- Layer by layer, inside the step (`layerwise`; host blocks, and disk blocks when `disk_in_step`):
  `load_in_step` says so, the scheduler counts the tokens as computed and runs the prompt's tail in
  this very step; the loader copies layer 0 of every block, then layer 1, ...; before layer l the
  forward pass calls `wait_layer(l)`, which returns once layer l of every such load is in. So the
  copy of layer l+1 overlaps layer l's compute (on a GPU: a copy stream, one event per layer, the
  compute stream waits on it; the engine thread does not block). A disk block is read a layer at a
  time, and each layer's rows are checked (disk.py's per-row crc32s) before they are copied. A
  corrupt one stops the load at that layer (the file is deleted, nothing of it copied) and names the
  request in `failed_in_step` before wait_layer lets the step past that layer: the engine drops the
  step's results for it and the scheduler frees its blocks (none was published) and recomputes it.
  A pinned host slot cannot vanish, so a host-only load fails only on an exception.
  `disk_in_step` is off on an engine whose connector ships KV as it is computed (a prefill worker:
  a layer already streamed cannot be taken back), and a remote prefill's reservation loads in step
  only host blocks (`step_tokens`): there disk blocks load whole, before the step.
- Whole blocks, before the step (disk blocks as above, or `layerwise` off): the
  loader reads, checks and copies every block, `finished_loading` reports it, and the request
  computes its tail in a later step. A block missing or corrupt fails the load: the scheduler frees
  the blocks and recomputes the prompt; a corrupt file is deleted first.

The byte moves between the device caches and host memory (streams, events) are
kv_transfer/tiers/device_copy.py's; the write-behind and load-back methods live in write_behind.py and
load_back.py (mixins over this class's state), setup, peer pulls and figures here.

Tenant isolation: blocks are keyed by the engine's salted chain hashes (engine/hashing.py), so a
lookup under one salt never finds another's blocks, in any tier.

Events: ("stored" | "removed", hashes, "host" | "disk") go to the worker's BlockEventLog as blocks
enter and leave each tier; on start the disk tier is verified (every file's checksum) and its blocks
announced as "stored" on "disk" (warm restart).

Threads: the engine thread calls the KVConnector methods; the writer, the loader (whole-block loads)
and the layer loader (in-step loads: a step never waits behind a disk read) share the two
TierIndexes with it under one lock; a peer's pull reads tiers from an RPC thread (`read_blocks`). A
load writes only into blocks its request holds (the request's end is held back by
`request_finished` until the loader is done with them).
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

import torch

from pdcluster.engine.kv_connector import KVConnector
from pdcluster.kv_transfer.tiers.block_format import Geometry, decode
from pdcluster.kv_transfer.tiers.device_copy import DeviceCopier
from pdcluster.kv_transfer.tiers.disk import CorruptBlock, DiskStore
from pdcluster.kv_transfer.tiers.host import HostPool
from pdcluster.kv_transfer.tiers.index import TierIndex
from pdcluster.kv_transfer.tiers.load_back import LoadBack, _Load
from pdcluster.kv_transfer.tiers.stats import SnapshotStats, TierStats
from pdcluster.kv_transfer.tiers.write_behind import WriteBehind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TierConfig:
    host_bytes: int = 0                 # host-memory tier capacity (0: none)
    disk_dir: str | None = None         # disk tier directory (None: none)
    disk_bytes: int = 0                 # disk tier capacity (0 with a directory: none)
    codec: str = "none"                 # how blocks are kept below the device: none | int8 | fp8
    protected_fraction: float = 0.9     # SLRU: of each tier, what blocks loaded back may hold
    layerwise: bool = True              # host and disk hits load layer by layer inside the step (see the module doc)
    queue_blocks: int = 4096            # evicted blocks waiting for the writer, most; more are dropped
    queue_bytes: int = 2**30            # ... and at most this much staging memory (pinned on a GPU host)
    write_through: bool = True          # store blocks below when computed, not only when evicted
    model: str = ""                     # the weights' identity (engine/weights_id.py): disk files name it, and a
                                        # restart on other weights finds none of its own

    @property
    def enabled(self) -> bool:
        return self.host_bytes > 0 or (self.disk_dir is not None and self.disk_bytes > 0)


class TierConnector(WriteBehind, LoadBack, KVConnector):
    JOIN_S = 10.0           # close(): how long each thread may take to finish its queue

    def __init__(self, cfg: TierConfig, events=None, disk_in_step: bool = True):
        """events: the worker's BlockEventLog (engine/block_events.py), or None. disk_in_step: disk hits
        may load layer by layer in the step (False where the engine ships KV as it computes it)."""
        self.cfg, self.events = cfg, events
        self.disk_in_step = disk_in_step and cfg.layerwise
        self.geom: Geometry | None = None
        self.host: HostPool | None = None
        self.disk: DiskStore | None = None
        self.index: dict[str, TierIndex] = {}          # "host" / "disk" -> its bookkeeping
        self.stats: dict[str, TierStats] = {}
        self.snapshot = SnapshotStats()
        self._lock = threading.Lock()                  # guards index, _pending, _loads, _done, _failed*, _released
        # held by the writer for a whole write batch (whose events are its net change, sent at its end), and by
        # tier_hashes: a resync snapshot never sees a batch half done (taken before _lock, never inside it)
        self._batch = threading.Lock()
        self._pending: set[int] = set()                # hashes copied out, not yet stored by the writer
        self._queued_blocks = 0
        self.queue_limit = cfg.queue_blocks            # in blocks; register_caches bounds it by queue_bytes too
        self._loads: dict[str, _Load] = {}             # in flight, by request id
        self._held: set[str] = set()                   # ended during their load: freed when it stops
        self._done: list[tuple[str, bool]] = []
        self._in_step: list[_Load] = []                # in_step loads not yet all copied, oldest first
        self._in_step_ids: set[str] = set()            # after_alloc chose in_step, load_in_step not yet asked
        self._layer_cv = threading.Condition(self._lock)   # a layer of an in_step load was issued
        self.loads = cfg.layerwise and (cfg.host_bytes > 0 or (self.disk_in_step and cfg.enabled))  # wait_layer wanted
        self._failed: list[str] = []                   # in_step loads that failed, not yet taken (failed_in_step)
        self._host_only: set[str] = set()              # step_tokens offered these (reservations): host blocks only
        self._failed_reservations: set[str] = set()    # reservations whose tier load failed (reservation_failed)
        self._released: list[str] = []
        self._writes: queue.Queue = queue.Queue()
        self._reads: queue.Queue = queue.Queue()          # whole-block loads (the loader thread)
        self._layer_reads: queue.Queue = queue.Queue()    # in_step loads: their own thread, so a step's
                                                          # wait_layer never queues behind a disk read
        self._threads: list[threading.Thread] = []
        self.ready = threading.Event()                 # set once the disk tier is verified (warm restart)
        self._closed = False

    # setup
    def register_caches(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        if self.geom is not None:
            if k_caches is self.k and v_caches is self.v:       # the same engine taking it back: as it was
                return
            raise RuntimeError("a TierConnector serves one engine")
        try:
            self._register(k_caches, v_caches)
        except BaseException:       # (a bad setting, out of memory): nothing of the tiers stays held
            if self.disk is not None:
                self.disk.unlock()
            raise

    def _register(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        self.k, self.v = k_caches, v_caches
        self.device = k_caches[0].device
        self.geom = g = Geometry.of(k_caches, self.cfg.codec, self.cfg.model)
        cuda = self.device.type == "cuda"
        host_blocks = self.cfg.host_bytes // g.block_bytes
        if host_blocks:
            self.host = HostPool(g, host_blocks, pin=cuda)
            self._add_tier("host", host_blocks, g.block_bytes)
        if self.cfg.disk_dir is not None and self.cfg.disk_bytes > 0:
            disk = DiskStore(self.cfg.disk_dir, g)
            if self.cfg.disk_bytes // disk.file_bytes:            # room for one block at least
                disk.lock()                                       # (until close(): one tier per directory)
                self.disk = disk
                self._add_tier("disk", self.cfg.disk_bytes // disk.file_bytes, disk.file_bytes)
        if not self.index:
            log.warning("KV tiers: host %d B / disk %d B hold no block of %d B; tiers off", self.cfg.host_bytes,
                        self.cfg.disk_bytes, g.block_bytes)
        self.copier = DeviceCopier(k_caches, v_caches)
        staged = g.block_bytes if g.native else math.prod(g.shape) * g.dtype.itemsize   # one block's staging copy
        self.queue_limit = max(1, min(self.cfg.queue_blocks, self.cfg.queue_bytes // staged))
        for name, fn, args in (("writer", self._writer, ()), ("loader", self._loader, (self._reads,)),
                                ("layer-loader", self._loader, (self._layer_reads,))):
            t = threading.Thread(target=fn, args=args, name=f"kv-tier-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._writes.put(("scan",))

    def _add_tier(self, tier: str, blocks: int, block_bytes: int) -> None:
        self.index[tier] = TierIndex(blocks, self.cfg.protected_fraction)
        self.stats[tier] = TierStats(tier, blocks, block_bytes)

    # peer pulls this worker serves (kv_transfer/pull.py serve_pull; any thread but the engine's)
    def read_blocks(self, hashes: list[int]) -> tuple[list[torch.Tensor], dict[str, int]] | None:
        """(host copies [2L, bs, h, d] (cache dtype) of the blocks a lower tier holds under `hashes`
        (host first), blocks read per tier), or None if any is not held ready (all or nothing, as the device read). The
        entries are pinned while read, so neither the writer's LRU nor another load can drop them;
        a corrupt disk file is dropped (and the read fails). Runs on the caller's thread: the engine
        steps meanwhile. Counted per tier as `served` blocks and a `serve_s` latency."""
        if self._closed or not self.index or not hashes:
            return None
        parts: list[tuple[int, str, int]] = []
        with self._lock:
            for h in hashes:
                for tier, idx in self.index.items():
                    e = idx.get(h)
                    if e is not None and e.ready:
                        idx.pin(h)
                        parts.append((h, tier, e.slot))
                        break
                else:
                    break
        if len(parts) != len(hashes):
            self._unpin(parts)
            return None
        t0 = {t: 0.0 for t in self.index}
        out, corrupt = [], []
        try:
            for h, tier, slot in parts:
                t = time.perf_counter()
                if tier == "host":
                    out.append(self.host.get(slot).clone())     # get is a view of the slot: copy while pinned
                else:
                    try:
                        out.append(decode(self.geom, *self.disk.read(h)))
                    except (CorruptBlock, OSError) as e:  # corrupt, gone or unreadable: a bad block (read deleted it)
                        log.warning("KV disk tier (serving a pull): %s", e)
                        corrupt.append(h)
                        break
                t0[tier] += time.perf_counter() - t
        finally:
            if corrupt:
                self._drop_corrupt(corrupt)                 # drops one pin on each
                for h in corrupt:                           # (a hash named twice holds two pins: one stays to undo)
                    parts.pop(next(i for i, p in enumerate(parts) if p[0] == h))
            self._unpin(parts)
        if corrupt:
            return None
        counts = {}
        for tier in self.index:
            n = sum(1 for _, tt, _ in parts if tt == tier)
            if n:
                counts[tier] = n
                st = self.stats[tier]
                st.add(served=n, served_bytes=n * st.block_bytes)
                st.observe("serve_s", t0[tier])
        return out, counts

    def _unpin(self, parts: list[tuple[int, str, int]]) -> None:
        with self._lock:
            self._unpin_locked(parts)

    def finished_sending(self) -> list[str]:
        with self._lock:
            out, self._released = self._released, []
        return out

    # figures and lifecycle
    def figures(self) -> list[dict]:
        return [st.as_dict() for st in self.stats.values()]

    def tier_hashes(self) -> tuple[int, dict[str, list[int]]]:
        """(event sequence number, every ready block per tier): a resync of the router's index. The
        number is read first and each tier's events are recorded after its index changed, so every
        event up to it is reflected here; later ones may be too ("stored"/"removed" are idempotent)."""
        with self._batch:       # a batch's blocks stored and evicted again would stay in the router for good
            seq = self.events.seq if self.events is not None else 0
            with self._lock:
                return seq, {t: [h for h in idx.hashes() if idx.get(h).ready] for t, idx in self.index.items()}

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Until the writer has stored every block evicted so far and the disk is verified (tests, benches)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._writes.unfinished_tasks == 0 and (not self._threads or self.ready.is_set()):
                return True
            time.sleep(0.002)
        return False

    def close(self) -> None:
        """Store what is queued, end the threads, release the disk directory; then the engine runs as without
        tiers (a later prompt finds nothing below: no load would ever run). Idempotent. A writer still busy
        after JOIN_S keeps the directory locked until it ends: another engine must not scan or write it
        meanwhile."""
        if self._closed:
            return
        self._closed = True
        self._writes.put(None)
        self._reads.put(None)
        self._layer_reads.put(None)
        for t in self._threads:
            t.join(timeout=self.JOIN_S)
        busy = [t for t in self._threads if t.is_alive()]
        self._threads = []
        self.loads = False
        if self.disk is None:
            return
        if not busy:
            self.disk.unlock()
            return
        log.warning("KV tiers: %s still busy after %.0fs; the disk directory stays locked until done",
                    ", ".join(t.name for t in busy), self.JOIN_S)

        def unlock_when_done(disk=self.disk):
            for t in busy:
                t.join()
            disk.unlock()
        threading.Thread(target=unlock_when_done, name="kv-tier-unlock", daemon=True).start()
