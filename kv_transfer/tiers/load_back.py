"""TierConnector's load-back half: lower-tier hits pinned, loaded in step or before it, waited for.

kv_transfer/tiers/connector.py holds the whole picture. The scheduler's side (how many tokens a lower
tier holds, pinning them, loads in step or before it, wait_layer) runs on the engine thread; the
loader threads copy blocks into the device pool. A mixin: the state (index, lock, queues, stats,
copier) is TierConnector's."""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from pdcluster.kv_transfer.tiers.block_format import for_device, for_device_rows
from pdcluster.kv_transfer.tiers.disk import CorruptBlock

log = logging.getLogger("pdcluster.kv_transfer.tiers.connector")


@dataclass
class _Load:
    """One load job: a request's blocks from the tiers into its device blocks."""
    request_id: str
    block_ids: list[int]
    parts: list[tuple[int, str, int]]       # per block: (chain hash, tier, host slot or -1)
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    in_step: bool = False                   # loaded layer by layer inside the step (wait_layer)
    reservation: bool = False               # a remote prefill's reservation (step_tokens): never stepped,
                                            # so a failure is reported by reservation_failed, not failed_in_step
    layers_done: int = 0                    # in_step: layers [0, layers_done) issued (CPU: copied)
    events: list = field(default_factory=list)   # in_step on a GPU: per layer, its copy's CUDA event
    after: object = None                    # on a GPU: the compute stream's work queued before the load


class LoadBack:
    def external_tokens(self, request, num_local_tokens: int) -> int:
        if self._closed or not self.index:           # (closed: no loader would run the load)
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
            reservation = request.request_id in self._host_only     # step_tokens offered these: host only
            self._host_only.discard(request.request_id)
            job.in_step = (self.cfg.layerwise and len(job.parts) == nb
                           and all(tier == "host" or (tier == "disk" and self.disk_in_step and not reservation)
                                   for _, tier, _ in job.parts))
            if reservation and not job.in_step:     # a host block went since step_tokens: no load at all, the
                self._unpin_locked(job.parts)       # scheduler has the sender send these blocks (add_remote),
                job = None                          # and nothing else may write them
            else:
                job.reservation = reservation
                if job.in_step:
                    self._in_step.append(job)
                    self._in_step_ids.add(job.request_id)
                self._loads[job.request_id] = job
        if job is None:
            return
        (self._layer_reads if job.in_step else self._reads).put(job)

    def step_tokens(self, request, num_local_tokens: int) -> int:
        """external_tokens, counting only host-tier blocks when layerwise: a remote prefill's
        reservation cannot recompute, so it loads in step only what cannot fail (a pinned host slot),
        never a disk block (which can turn out corrupt)."""
        if self._closed or not self.loads or "host" not in self.index:
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
            if n:
                self._host_only.add(request.request_id)
        return n * bs

    def wait_loaded(self, request_id: str, timeout_s: float) -> None:
        """Until request_id's load (if one runs) has ended (any thread)."""
        with self._lock:
            job = self._loads.get(request_id)
        if job is not None:
            job.done.wait(timeout_s)

    def load_in_step(self, request) -> bool:
        """after_alloc's choice for request (asked once, right after it). From the choice itself, not from the
        job: the loader may have finished or failed the job already, and an in_step job is never reported
        by finished_loading (its failure comes through failed_in_step), so a False there left the request
        waiting for a load that had ended."""
        with self._lock:
            if request.request_id in self._in_step_ids:
                self._in_step_ids.discard(request.request_id)
                return True
            return False

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
                    self._unpin_locked(job.parts)
                    self._loads.pop(job.request_id, None)
                    if job.request_id in self._held:
                        self._held.discard(job.request_id)
                        self._released.append(job.request_id)
                    elif not job.cancelled and not job.in_step:     # in_step loads: only a failure is
                        self._done.append((job.request_id, ok))
                    elif not job.cancelled and not ok and job.reservation:
                        self._failed_reservations.add(job.request_id)   # start_remote asks (take_loaded)
                    elif not job.cancelled and not ok:
                        self._failed.append(job.request_id)         # reported, before wait_layer returns
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
                except (CorruptBlock, OSError) as e:      # corrupt, gone or unreadable: a bad block (read deleted it)
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
        if per_tier.get("disk"):
            self.disk.touch(per_tier["disk"])           # (this loader thread's, not the engine's)
        for tier, hs in per_tier.items():
            if hs:
                st = self.stats[tier]
                st.add(hits=len(hs), loaded_bytes=len(hs) * st.block_bytes)
                st.observe("load_s", t0[tier] + copy_share * len(hs))
        return not job.cancelled

    def _load_layers(self, job: _Load) -> bool:
        """An in_step load: host and disk blocks into the device pool, layer after layer, announcing
        each layer to wait_layer. The blocks stay pinned throughout. A disk block is read a layer at a
        time and each layer checked before it is copied (DiskStore.open_rows), so a corrupt one never
        reaches the device pool: the copy stops at that layer, the file is dropped and the load fails
        (the scheduler discards the step's work for the request and recomputes it, failed_in_step)."""
        g, t = self.geom, time.perf_counter()
        L, n = g.num_layers, len(job.parts)
        hosts, readers = [], []          # (position, its slot's views) / (position, RowReader)
        try:
            for i, (h, tier, slot) in enumerate(job.parts):
                if tier == "host":
                    hosts.append((i, self.host.encoded(slot)))        # views of the pinned slot
                else:
                    readers.append((i, self.disk.open_rows(h)))       # read ahead now, checked layer by layer

            def layer_rows(layer: int):
                """Every block's K and V rows of `layer`, stacked: data [2, n, bs, h, d], scales [2, n, h]."""
                data = torch.empty((2, n, *g.shape[1:]), dtype=g.stored_dtype)
                scales = torch.empty((2, n, g.kv_heads), dtype=torch.float32) if g.codec != "none" else None
                for i, (d, s) in hosts:
                    data[:, i] = d[layer::L]
                    if scales is not None:
                        scales[:, i] = s[layer::L]
                for i, r in readers:
                    r.layer_into(layer, data[:, i], scales[:, i] if scales is not None else None)
                return for_device_rows(g, data, scales)

            def layer_done(layer: int, event) -> None:
                with self._layer_cv:
                    if event is not None:
                        job.events.append(event)
                    job.layers_done = layer + 1
                    self._layer_cv.notify_all()

            if not self.copier.write_layers(job.block_ids, layer_rows, job.after, layer_done, lambda: job.cancelled):
                return False        # the request ended before its step ran: nothing reads these blocks
        except CorruptBlock as e:
            log.warning("KV disk tier (layer-wise load): %s", e)
            self._drop_corrupt([e.block_hash])              # drops this job's pin on it
            job.parts = [p for p in job.parts if p[0] != e.block_hash]
            self.stats["disk"].add(load_failures=1)
            return False
        finally:
            for _, r in readers:
                r.close()
        with self._lock:
            for h, tier, _ in job.parts:
                self.index[tier].hit(h)
        if self.disk is not None:
            self.disk.touch([h for h, tier, _ in job.parts if tier == "disk"])
        dt = time.perf_counter() - t
        for tier in self.index:
            n = sum(1 for _, tt, _ in job.parts if tt == tier)
            if n:
                st = self.stats[tier]
                st.add(hits=n, loaded_bytes=n * st.block_bytes)
                st.observe("load_s", dt * n / len(job.parts))
        return True

    def _drop_corrupt(self, hashes: list[int]) -> None:
        """Forget corrupt or unreadable disk blocks (their files are deleted already). Each holds the
        caller's pin, dropped here: the entry leaves now, or, where another load still pins it, is
        unready until that load unpins it (and fails too); "removed" is announced as it leaves."""
        idx, st = self.index["disk"], self.stats["disk"]
        gone, found = [], 0
        with self._lock:
            for h in hashes:
                e = idx.get(h)
                if e is not None:
                    found += not e.doomed           # counted once: by the first of its readers to find it bad
                    idx.doom(h)
                    if idx.unpin(h):
                        gone.append(h)
            st.blocks = len(idx)
            self._emit("removed", gone, "disk")     # under the lock: events keep the index's order
        st.add(corrupt=found)

    def _unpin_locked(self, parts: list[tuple[int, str, int]]) -> None:
        """Drop one pin of each part (under the lock); doomed entries that leave with it are announced
        "removed" here, under the lock, so the events' order is the index's (a writer's "stored" after)."""
        gone: dict[str, list[int]] = {}
        for h, tier, _ in parts:
            if self.index[tier].unpin(h):
                gone.setdefault(tier, []).append(h)
        for tier, hs in gone.items():
            self.stats[tier].blocks = len(self.index[tier])
            self._emit("removed", hs, tier)

    def failed_in_step(self) -> list[str]:
        """Requests whose in_step load failed (a corrupt disk block): layers from the bad one on are not
        in their blocks. Recorded before the load is marked done, so before wait_layer lets a step past
        the layer; the engine asks after each forward pass and drops those requests' results."""
        with self._lock:
            out, self._failed = self._failed, []
        return out

    def reservation_failed(self, request_id: str) -> str | None:
        """Why a remote prefill's reservation lacks the blocks its host tier was loading into it (the
        load failed, or still runs after wait_loaded gave up), else None; forgets a failure.
        MultiConnector.take_loaded asks this beside its transfer connector."""
        with self._lock:
            if request_id in self._failed_reservations:
                self._failed_reservations.discard(request_id)
                return "its blocks from the host cache tier failed to load"
            if request_id in self._loads:
                return "its blocks from the host cache tier are still loading"
        return None

    def finished_loading(self) -> list[tuple[str, bool]]:
        with self._lock:
            out, self._done = self._done, []
        return out

    def request_finished(self, request_id: str, block_ids: list[int]) -> bool:
        with self._lock:
            self._failed_reservations.discard(request_id)
            self._in_step_ids.discard(request_id)
            job = self._loads.get(request_id)
            if job is None:
                return False
            job.cancelled = True
            self._held.add(request_id)
            return True

    def request_aborted(self, request_id: str) -> None:
        with self._lock:
            self._failed_reservations.discard(request_id)
            self._in_step_ids.discard(request_id)
            job = self._loads.get(request_id)
            if job is not None:
                job.cancelled = True
