"""TierConnector: the engine's KV connector for a worker's host-memory and disk cache tiers.

    device pool (engine BlockPool) --evicted--> writer thread --> host pool (HostPool) + disk (DiskStore)
    device pool <--loader thread <-- host / disk   (a prompt whose next blocks a lower tier holds)

Write-behind. When the device pool evicts cached blocks (`evicted`, on the engine thread, before the
step that reuses them runs), their KV is copied into a staging tensor: the only work on the step's
path (timed in `snapshot`). Blocks that every tier already holds are only touched in the LRU, no copy.
The writer thread encodes them (codec none | int8 | fp8) and stores each into the host pool and the
disk directory (write-through below the device, so the disk holds every evicted block for a warm
restart). If more than `queue_blocks` blocks wait, new evictions are dropped rather than slowing
steps. A GPU host copies to pinned staging memory asynchronously; the writer waits for the copy.

Load-back. `external_tokens` counts the request's next blocks (after its device prefix hits) that a
lower tier holds, ready; the scheduler allocates blocks for them, `after_alloc` pins the entries and
queues a load job for the loader thread. Two ways:
- Layer by layer, inside the step (`layerwise`, when every block comes from the host tier):
  `load_in_step` says so, the scheduler counts the tokens as computed and runs the prompt's tail in
  this very step; the loader copies layer 0 of every block, then layer 1, ...; before layer l the
  forward pass calls `wait_layer(l)`, which returns once layer l of every such load is in. So the
  copy of layer l+1 overlaps layer l's compute (on a GPU: a copy stream, one event per layer, the
  compute stream waits on it; the engine thread does not block). A pinned host slot cannot vanish,
  so such a load cannot fail.
- Whole blocks, before the step (disk blocks, which can turn out corrupt; or `layerwise` off): the
  loader reads, checks and copies every block, `finished_loading` reports it, and the request
  computes its tail in a later step. A block missing or corrupt fails the load: the scheduler frees
  the blocks and recomputes the prompt; a corrupt file is deleted first.

The byte moves between the device caches and host memory (streams, events) are
kv_transfer/tiers/device_copy.py's.

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
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from pdcluster.engine.kv_connector import KVConnector
from pdcluster.kv_transfer.tiers.block_format import Geometry, decode, for_device, staged
from pdcluster.kv_transfer.tiers.device_copy import DeviceCopier
from pdcluster.kv_transfer.tiers.disk import CorruptBlock, DiskStore
from pdcluster.kv_transfer.tiers.host import HostPool
from pdcluster.kv_transfer.tiers.index import TierIndex
from pdcluster.kv_transfer.tiers.stats import SnapshotStats, TierStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TierConfig:
    host_bytes: int = 0                 # host-memory tier capacity (0: none)
    disk_dir: str | None = None         # disk tier directory (None: none)
    disk_bytes: int = 0                 # disk tier capacity (0 with a directory: none)
    codec: str = "none"                 # how blocks are kept below the device: none | int8 | fp8
    protected_fraction: float = 0.9     # SLRU: of each tier, what blocks loaded back may hold
    layerwise: bool = True              # host-tier hits load layer by layer inside the step (see the module doc)
    queue_blocks: int = 4096            # evicted blocks waiting for the writer, most; more are dropped

    @property
    def enabled(self) -> bool:
        return self.host_bytes > 0 or (self.disk_dir is not None and self.disk_bytes > 0)


@dataclass
class _Load:
    request_id: str
    block_ids: list[int]
    parts: list[tuple[int, str, int]]       # per block: (chain hash, tier, host slot or -1)
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    in_step: bool = False                   # loaded layer by layer inside the step (wait_layer)
    layers_done: int = 0                    # in_step: layers [0, layers_done) issued (CPU: copied)
    events: list = field(default_factory=list)   # in_step on a GPU: per layer, its copy's CUDA event
    after: object = None                    # on a GPU: the compute stream's work queued before the load


class TierConnector(KVConnector):
    def __init__(self, cfg: TierConfig, events=None):
        """events: the worker's BlockEventLog (engine/block_events.py), or None."""
        self.cfg, self.events = cfg, events
        self.geom: Geometry | None = None
        self.host: HostPool | None = None
        self.disk: DiskStore | None = None
        self.index: dict[str, TierIndex] = {}          # "host" / "disk" -> its bookkeeping
        self.stats: dict[str, TierStats] = {}
        self.snapshot = SnapshotStats()
        self._lock = threading.Lock()                  # guards index, _pending, _loads, _done, _released
        self._pending: set[int] = set()                # hashes copied out, not yet stored by the writer
        self._queued_blocks = 0
        self._loads: dict[str, _Load] = {}             # in flight, by request id
        self._held: set[str] = set()                   # ended during their load: freed when it stops
        self._done: list[tuple[str, bool]] = []
        self._in_step: list[_Load] = []                # in_step loads not yet all copied, oldest first
        self._layer_cv = threading.Condition(self._lock)   # a layer of an in_step load was issued
        self.loads = cfg.layerwise and cfg.host_bytes > 0   # wait_layer wanted
        self._released: list[str] = []
        self._writes: queue.Queue = queue.Queue()
        self._reads: queue.Queue = queue.Queue()          # whole-block loads (the loader thread)
        self._layer_reads: queue.Queue = queue.Queue()    # in_step loads: their own thread, so a step's
                                                          # wait_layer never queues behind a disk read
        self._threads: list[threading.Thread] = []
        self.ready = threading.Event()                 # set once the disk tier is verified (warm restart)

    # setup
    def register_caches(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        if self.geom is not None:
            if k_caches is self.k and v_caches is self.v:       # the same engine taking it back: as it was
                return
            raise RuntimeError("a TierConnector serves one engine")
        self.k, self.v = k_caches, v_caches
        self.device = k_caches[0].device
        self.geom = g = Geometry.of(k_caches, self.cfg.codec)
        cuda = self.device.type == "cuda"
        host_blocks = self.cfg.host_bytes // g.block_bytes
        if host_blocks:
            self.host = HostPool(g, host_blocks, pin=cuda)
            self._add_tier("host", host_blocks, g.block_bytes)
        if self.cfg.disk_dir is not None and self.cfg.disk_bytes > 0:
            disk = DiskStore(self.cfg.disk_dir, g)
            if self.cfg.disk_bytes // disk.file_bytes:            # room for one block at least
                self.disk = disk
                self._add_tier("disk", self.cfg.disk_bytes // disk.file_bytes, disk.file_bytes)
        if not self.index:
            log.warning("KV tiers: host %d B / disk %d B hold no block of %d B; tiers off", self.cfg.host_bytes,
                        self.cfg.disk_bytes, g.block_bytes)
        self.copier = DeviceCopier(k_caches, v_caches)
        for name, fn, args in (("writer", self._writer, ()), ("loader", self._loader, (self._reads,)),
                                ("layer-loader", self._loader, (self._layer_reads,))):
            t = threading.Thread(target=fn, args=args, name=f"kv-tier-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._writes.put(("scan",))

    def _add_tier(self, tier: str, blocks: int, block_bytes: int) -> None:
        self.index[tier] = TierIndex(blocks, self.cfg.protected_fraction)
        self.stats[tier] = TierStats(tier, blocks, block_bytes)

    # write-behind (engine thread: the copy; writer thread: the rest)
    def evicted(self, block_ids: list[int], hashes: list[int]) -> None:
        if not self.index:
            return
        t0 = time.perf_counter()
        todo_ids, todo = [], []
        with self._lock:
            for b, h in zip(block_ids, hashes):
                if h in self._pending:
                    continue
                held = True
                for idx in self.index.values():
                    if h in idx:
                        idx.insert(h)               # held: only refresh its LRU position
                    else:
                        held = False
                if held:
                    self.snapshot.skipped += 1
                    continue
                todo_ids.append(b)
                todo.append(h)
            if not todo:
                return
            if self._queued_blocks + len(todo) > self.cfg.queue_blocks:
                self.snapshot.dropped += len(todo)
                return
            self._pending.update(todo)
            self._queued_blocks += len(todo)
        staging, ready = self.copier.copy_out(todo_ids, self.geom.shape)
        self._writes.put(("store", todo, staging, ready))
        s = self.snapshot
        s.calls += 1
        s.blocks += len(todo)
        s.seconds += time.perf_counter() - t0

    def _writer(self) -> None:
        while True:
            job = self._writes.get()
            try:
                if job is None:
                    return
                if job[0] == "scan":
                    self._scan()
                else:
                    self._store(*job[1:])
            except Exception:                           # a full disk, say: keep serving without the block
                log.exception("KV tier writer: %s failed", job[0] if job else job)
            finally:
                self._writes.task_done()

    def _store(self, hashes: list[int], staging: torch.Tensor, ready) -> None:
        if ready is not None:
            ready.synchronize()
        stored = {t: [] for t in self.index}
        removed = {t: [] for t in self.index}
        try:
            for i, h in enumerate(hashes):
                data, scales = staged(self.geom, staging, i)
                for tier in self.index:
                    if self._put(tier, h, data, scales, removed[tier]):
                        stored[tier].append(h)
        finally:
            with self._lock:
                self._pending.difference_update(hashes)
                self._queued_blocks -= len(hashes)
            for tier in self.index:
                self._emit("removed", removed[tier], tier)
                self._emit("stored", stored[tier], tier)

    def _put(self, tier: str, h: int, data, scales, removed: list[int]) -> bool:
        """Store one encoded block in `tier` unless held there; appends evicted hashes to `removed`."""
        t0 = time.perf_counter()
        idx, st = self.index[tier], self.stats[tier]
        with self._lock:
            if h in idx:
                return False
            got = idx.insert(h)
            if got is None:                 # every entry pinned: skip this block
                return False
            slot, victims = got
            idx.pin(h)
            st.blocks = len(idx)
        removed += [v for v, _ in victims]
        st.add(evicted=len(victims))
        ok = False
        try:
            if tier == "host":
                self.host.put(slot, data, scales)
            else:
                for v, _ in victims:
                    self.disk.delete(v)
                self.disk.write(h, data, scales)
            ok = True
        finally:
            with self._lock:
                idx.unpin(h)
                if ok:
                    idx.get(h).ready = True
                else:
                    idx.remove(h)
                st.blocks = len(idx)
        st.add(stored=1, stored_bytes=st.block_bytes)
        st.observe("store_s", time.perf_counter() - t0)
        return True

    def _scan(self) -> None:
        """Warm restart: verify the disk tier, index its intact blocks (oldest first), announce them."""
        try:
            if self.disk is None:
                return
            t0 = time.perf_counter()
            good, bad = self.disk.scan()
            idx, st = self.index["disk"], self.stats["disk"]
            added, dropped = [], []
            with self._lock:
                for h in good:
                    got = idx.insert(h)
                    if got is None:
                        break
                    idx.get(h).ready = True
                    added.append(h)
                    dropped += [v for v, _ in got[1]]
                st.blocks = len(idx)
            for v in dropped:                               # more files than the capacity: oldest go
                self.disk.delete(v)
            st.add(corrupt=bad, evicted=len(dropped))
            gone = set(dropped)
            kept = [h for h in added if h not in gone]
            self._emit("stored", kept, "disk")
            if good or bad:
                log.info("KV disk tier %s: %d blocks verified, %d corrupt files dropped, %d over capacity "
                         "(%.2fs)", self.disk.dir, len(kept), bad, len(dropped), time.perf_counter() - t0)
        finally:
            self.ready.set()

    def _emit(self, kind: str, hashes: list[int], tier: str) -> None:
        if hashes and self.events is not None:
            self.events.record(kind, hashes, tier)

    # load-back (engine thread: decide and pin; loader thread: copy)
    def external_tokens(self, request, num_local_tokens: int) -> int:
        if not self.index:
            return 0
        bs = self.geom.block_size
        last = (min(request.num_tokens, request.num_prefill_tokens) - 1) // bs   # keep the last token's block
        n = 0
        with self._lock:
            for h in request.block_hashes()[num_local_tokens // bs:last]:
                if not any((e := idx.get(h)) is not None and e.ready for idx in self.index.values()):
                    break
                n += 1
        return n * bs

    def after_alloc(self, request, block_ids: list[int], num_external_tokens: int) -> None:
        if not num_external_tokens:
            return
        bs = self.geom.block_size
        nb = num_external_tokens // bs
        start = request.num_computed_tokens // bs          # block_ids follow the request's local hits
        hashes = request.block_hashes()[start:start + nb]
        job = _Load(request.request_id, list(block_ids[:nb]), [])
        if self.copier.cuda:                # the blocks' earlier KV, being copied out on the compute stream
            job.after = torch.cuda.Event()  # (evicted, during this allocation), is read before the load
            job.after.record()              # overwrites it: the copy stream waits on this
        with self._lock:
            for h in hashes:
                for tier, idx in self.index.items():             # host first: the faster copy
                    e = idx.get(h)
                    if e is not None and e.ready:
                        idx.pin(h)
                        job.parts.append((h, tier, e.slot))
                        break
                else:
                    break                      # evicted since external_tokens: the load fails
            job.in_step = (self.cfg.layerwise and len(job.parts) == nb
                           and all(tier == "host" for _, tier, _ in job.parts))
            if job.in_step:
                self._in_step.append(job)
            self._loads[job.request_id] = job
        (self._layer_reads if job.in_step else self._reads).put(job)

    def step_tokens(self, request, num_local_tokens: int) -> int:
        """external_tokens, counting only host-tier blocks (those load in step) when layerwise."""
        if not self.loads or "host" not in self.index:
            return 0
        bs, idx = self.geom.block_size, self.index["host"]
        last = (min(request.num_tokens, request.num_prefill_tokens) - 1) // bs
        n = 0
        with self._lock:
            for h in request.block_hashes()[num_local_tokens // bs:last]:
                e = idx.get(h)
                if e is None or not e.ready:
                    break
                n += 1
        return n * bs

    def wait_loaded(self, request_id: str, timeout_s: float) -> None:
        """Until request_id's load (if one runs) has ended (any thread)."""
        with self._lock:
            job = self._loads.get(request_id)
        if job is not None:
            job.done.wait(timeout_s)

    def load_in_step(self, request) -> bool:
        with self._lock:
            job = self._loads.get(request.request_id)
            return job is not None and job.in_step

    def wait_layer(self, layer: int) -> None:
        """Until layer `layer` of every in_step load is issued (engine thread, before that layer runs).
        On a GPU the compute stream then waits on the layer's copy event, not the engine thread."""
        with self._layer_cv:
            jobs = list(self._in_step)
            if not self._layer_cv.wait_for(lambda: all(j.layers_done > layer or j.done.is_set() for j in jobs),
                                           timeout=120.0):
                raise RuntimeError(f"KV tier load of layer {layer} did not arrive in 120 s")
        if self.copier.cuda:
            cur = torch.cuda.current_stream(self.device)
            for j in jobs:
                if layer < len(j.events):
                    cur.wait_event(j.events[layer])

    def _loader(self, jobs: queue.Queue) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            ok = False
            try:
                ok = self._load_layers(job) if job.in_step else self._load(job)
            except Exception:
                log.exception("KV tier load of %s failed", job.request_id)
            finally:
                with self._lock:
                    for h, tier, _ in job.parts:
                        self.index[tier].unpin(h)
                    self._loads.pop(job.request_id, None)
                    if job.request_id in self._held:
                        self._held.discard(job.request_id)
                        self._released.append(job.request_id)
                    elif not job.cancelled and not job.in_step:     # in_step loads are never reported
                        self._done.append((job.request_id, ok))
                    if job.in_step:
                        self._in_step.remove(job)
                    job.done.set()
                    self._layer_cv.notify_all()

    def _load(self, job: _Load) -> bool:
        g = self.geom
        if len(job.parts) != len(job.block_ids):     # evicted between external_tokens and after_alloc
            self.stats[next(iter(self.stats))].add(load_failures=1)
            return False
        t0 = {t: 0.0 for t in self.index}
        blocks, corrupt = [], []
        for h, tier, slot in job.parts:
            if job.cancelled:
                return False
            t = time.perf_counter()
            if tier == "host":
                kv = for_device(g, *self.host.encoded(slot))    # views of the pinned slot (codec none / native)
            else:
                try:
                    kv = for_device(g, *self.disk.read(h))
                except (CorruptBlock, FileNotFoundError) as e:
                    log.warning("KV disk tier: %s", e)
                    corrupt.append(h)
                    break
            blocks.append(kv)
            t0[tier] += time.perf_counter() - t
        if corrupt:
            self._drop_corrupt(corrupt)                     # drops this job's pins on them
            job.parts = [p for p in job.parts if p[0] not in corrupt]
            self.stats["disk"].add(load_failures=1)
            return False
        t = time.perf_counter()
        self.copier.write_blocks(job.block_ids, blocks, job.after)
        per_tier = {tier: [h for h, tt, _ in job.parts if tt == tier] for tier in self.index}
        copy_share = (time.perf_counter() - t) / len(blocks)
        with self._lock:
            for h, tier, _ in job.parts:
                self.index[tier].hit(h)
        for tier, hs in per_tier.items():
            if hs:
                st = self.stats[tier]
                st.add(hits=len(hs), loaded_bytes=len(hs) * st.block_bytes)
                st.observe("load_s", t0[tier] + copy_share * len(hs))
        return not job.cancelled

    def _load_layers(self, job: _Load) -> bool:
        """An in_step load: host blocks into the device pool, layer after layer, announcing each
        layer to wait_layer. The blocks stay pinned throughout."""
        t = time.perf_counter()
        blocks = [for_device(self.geom, *self.host.encoded(slot)) for _, _, slot in job.parts]  # views: none / native

        def layer_done(layer: int, event) -> None:
            with self._layer_cv:
                if event is not None:
                    job.events.append(event)
                job.layers_done = layer + 1
                self._layer_cv.notify_all()

        if not self.copier.write_layers(job.block_ids, blocks, job.after, layer_done, lambda: job.cancelled):
            return False            # the request ended before its step ran: nothing reads these blocks
        with self._lock:
            for h, _, _ in job.parts:
                self.index["host"].hit(h)
        st = self.stats["host"]
        st.add(hits=len(blocks), loaded_bytes=len(blocks) * st.block_bytes)
        st.observe("load_s", time.perf_counter() - t)
        return True

    def _drop_corrupt(self, hashes: list[int]) -> None:
        """Forget corrupt disk blocks (their files are deleted already). Each holds this job's pin:
        it is dropped now; one another load still pins is only marked unready (that load fails too)."""
        idx, st = self.index["disk"], self.stats["disk"]
        gone = []
        with self._lock:
            for h in hashes:
                e = idx.get(h)
                if e is None:
                    continue
                e.ready = False
                idx.unpin(h)
                if idx.remove(h) is not None:
                    gone.append(h)
            st.blocks = len(idx)
        st.add(corrupt=len(hashes))
        self._emit("removed", gone, "disk")

    # peer pulls this worker serves (kv_transfer/pull.py serve_pull; any thread but the engine's)
    def read_blocks(self, hashes: list[int]) -> tuple[list[torch.Tensor], dict[str, int]] | None:
        """(host copies [2L, bs, h, d] (cache dtype) of the blocks a lower tier holds under `hashes`
        (host first), blocks read per tier), or None if any is not held ready (all or nothing, as the device read). The
        entries are pinned while read, so neither the writer's LRU nor another load can drop them;
        a corrupt disk file is dropped (and the read fails). Runs on the caller's thread: the engine
        steps meanwhile. Counted per tier as `served` blocks and a `serve_s` latency."""
        if not self.index or not hashes:
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
                    except (CorruptBlock, FileNotFoundError) as e:
                        log.warning("KV disk tier (serving a pull): %s", e)
                        corrupt.append(h)
                        break
                t0[tier] += time.perf_counter() - t
        finally:
            if corrupt:
                self._drop_corrupt(corrupt)                 # drops the pin on it
                parts = [p for p in parts if p[0] not in corrupt]
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
            for h, tier, _ in parts:
                self.index[tier].unpin(h)

    def finished_loading(self) -> list[tuple[str, bool]]:
        with self._lock:
            out, self._done = self._done, []
        return out

    def request_finished(self, request_id: str, block_ids: list[int]) -> bool:
        with self._lock:
            job = self._loads.get(request_id)
            if job is None:
                return False
            job.cancelled = True
            self._held.add(request_id)
            return True

    def finished_sending(self) -> list[str]:
        with self._lock:
            out, self._released = self._released, []
        return out

    def request_aborted(self, request_id: str) -> None:
        with self._lock:
            job = self._loads.get(request_id)
            if job is not None:
                job.cancelled = True

    # figures and lifecycle
    def figures(self) -> list[dict]:
        return [st.as_dict() for st in self.stats.values()]

    def tier_hashes(self) -> tuple[int, dict[str, list[int]]]:
        """(event sequence number, every ready block per tier): a resync of the router's index. The
        number is read first and each tier's events are recorded after its index changed, so every
        event up to it is reflected here; later ones may be too ("stored"/"removed" are idempotent)."""
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
        self._writes.put(None)
        self._reads.put(None)
        self._layer_reads.put(None)
        for t in self._threads:
            t.join(timeout=10.0)
        self._threads = []
