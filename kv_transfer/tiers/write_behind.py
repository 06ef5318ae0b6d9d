"""TierConnector's write half: computed (write-through) and evicted blocks stored in every tier.

kv_transfer/tiers/connector.py holds the whole picture. The engine thread copies blocks out, the
writer thread encodes and stores them in every tier, and at start it verifies the disk tier and
announces what survived (warm restart). A mixin: the state (index, lock, queues, stats, copier) is
TierConnector's."""
from __future__ import annotations

import logging
import os
import threading
import time

import torch

from pdcluster.kv_transfer.tiers.block_format import staged

log = logging.getLogger("pdcluster.kv_transfer.tiers.connector")


WRITER_NICE = 10      # the writer thread's nice increment: off every step's path, it gives way to the engine


def _yield_cpu() -> None:
    """Lower the calling thread's CPU priority (Linux: nice is per thread). The writer's stores are
    never waited for, while on a host with no core to spare (a CPU worker's engine threads) each of
    its copies would otherwise take time slices from a step."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + WRITER_NICE, 19))
    except (AttributeError, OSError):        # no per-thread priority here: the writer runs as it is
        pass


class WriteBehind:
    def computed(self, block_ids: list[int], hashes: list[int]) -> None:
        """Write-through: blocks are stored below as soon as they are computed, so a prefix the device
        pool never evicts (a hot system prompt: the LRU frees a request's tail first) is on disk
        when the worker crashes or restarts. Evicting them later costs no copy (held below)."""
        if self.cfg.write_through:
            self.evicted(block_ids, hashes)

    def evicted(self, block_ids: list[int], hashes: list[int]) -> None:
        if self._closed or not self.index:            # (closed: no writer would store them)
            return
        t0 = time.perf_counter()
        todo_ids, todo, touched = [], [], []
        disk = self.index.get("disk")
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
                if disk is not None and h in disk:
                    touched.append(h)               # (its file's too: by the writer, off this thread)
                if held:
                    self.snapshot.skipped += 1
                    continue
                todo_ids.append(b)
                todo.append(h)
            room = max(self.queue_limit - self._queued_blocks, 0)
            dropped = max(len(todo) - room, 0)          # the writer lags: keep what fits, drop the rest
            todo_ids, todo = todo_ids[:room], todo[:room]
            self._pending.update(todo)
            self._queued_blocks += len(todo)
        if dropped:
            self._dropped(dropped)
        if touched:
            self._writes.put(("touch", touched))
        if not todo:
            return
        try:
            staging, ready = self.copier.copy_out(todo_ids, self.geom.shape)
        except Exception:                               # out of (pinned) memory, say: these blocks go unstored,
            with self._lock:                            # and the eviction that called us goes on
                self._pending.difference_update(todo)
                self._queued_blocks -= len(todo)
            self._dropped(len(todo))
            log.exception("KV tiers: copying %d blocks out of the device pool failed; not stored", len(todo))
            return
        self._writes.put(("store", todo, staging, ready))
        s = self.snapshot
        s.calls += 1
        s.blocks += len(todo)
        s.seconds += time.perf_counter() - t0

    def _dropped(self, n: int) -> None:
        """n blocks went unstored (a full queue, a failed copy): counted in every tier and the snapshot."""
        self.snapshot.dropped += n
        for st in self.stats.values():
            st.add(dropped=n)

    def _writer(self) -> None:
        _yield_cpu()
        while True:
            job = self._writes.get()
            try:
                if job is None:
                    return
                if job[0] == "scan":
                    self._scan()
                elif job[0] == "touch":
                    self.disk.touch(job[1])
                else:
                    with self._batch:                   # tier_hashes waits for the batch's events
                        self._store(*job[1:])
            except Exception:                           # a full disk, say: keep serving without the block
                log.exception("KV tier writer: %s failed", job[0] if job else job)
            finally:
                self._writes.task_done()

    def _store(self, hashes: list[int], staging: torch.Tensor, ready) -> None:
        """Every block into every tier. A block one tier fails to take (a full or failing disk) is
        counted there (`store_failures`) and the rest go on. Events are the batch's net change per
        tier, block by block: held before the batch (its first change removed it) against held after
        (its last change stored it). A block stored and then evicted by a later one of the same batch is
        announced neither way, one evicted and stored again neither, one held before and evicted (however
        often it came back meanwhile) "removed": the router's view ends as the tier's."""
        changes = {t: [] for t in self.index}          # per tier, in order: (stored? else removed, hash)
        failed = {t: [0, None] for t in self.index}     # per tier: blocks not stored, the first error
        try:
            if ready is not None:
                ready.synchronize()
            for i, h in enumerate(hashes):
                data, scales = staged(self.geom, staging, i)
                for tier in self.index:
                    try:
                        if self._put(tier, h, data, scales, changes[tier]):
                            changes[tier].append((True, h))
                    except Exception as e:          # noqa: BLE001 - this tier goes without the block
                        failed[tier][0] += 1
                        failed[tier][1] = failed[tier][1] or e
        finally:
            with self._lock:
                self._pending.difference_update(hashes)
                self._queued_blocks -= len(hashes)
                for tier, idx in self.index.items():
                    first, last = {}, {}
                    for stored, h in changes[tier]:
                        first.setdefault(h, stored)
                        last[h] = stored
                    # announced under the lock, as the index is now: a block another thread dropped since
                    # (a corrupt file found by a load or a pull, announced "removed" then) is not "stored"
                    self._emit("removed", [h for h, s in last.items() if not first[h] and not s and h not in idx],
                               tier)
                    self._emit("stored", [h for h, s in last.items() if first[h] and s and (e := idx.get(h)) is not None
                                          and e.ready], tier)
            for tier in self.index:
                n, err = failed[tier]
                if n:
                    self.stats[tier].add(store_failures=n)
                    log.warning("KV %s tier: %d of %d blocks not stored (%s)", tier, n, len(hashes), err)

    def _put(self, tier: str, h: int, data, scales, changes: list[tuple[bool, int]]) -> bool:
        """Store one encoded block in `tier` unless held there; appends (False, hash) to `changes` per evicted one."""
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
        changes += [(False, v) for v, _ in victims]
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
            with self._lock:                                # as the index is now (a load may have dropped one)
                kept = [h for h in added if (e := idx.get(h)) is not None and e.ready]
                self._emit("stored", kept, "disk")
            if good or bad:
                log.info("KV disk tier %s: %d blocks verified, %d corrupt files dropped, %d over capacity "
                         "(%.2fs)", self.disk.dir, len(kept), bad, len(dropped), time.perf_counter() - t0)
        finally:
            self.ready.set()

    def _emit(self, kind: str, hashes: list[int], tier: str) -> None:
        if hashes and self.events is not None:
            self.events.record(kind, hashes, tier)
