"""The router's workers: who is registered, whether each is healthy, and what each last reported.

Each status poll is a health check (a worker that misses it takes no placements until it answers),
a load report (KV blocks, queues, step counters for the learned rates, measured links) and the feed
of the global prefix index (block events, resynced after a gap). Link probes and background aborts
run from here too. Pure asyncio: the clients (router/workers.py) hold the Ray calls.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Awaitable, Callable

from pdcluster.messages import CacheSnapshot, WorkerStatus
from pdcluster.router.config import RouterConfig
from pdcluster.router.errors import WorkerGone, WorkerLost
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.placement import WorkerLoad
from pdcluster.router.prefix_index import PrefixIndex
from pdcluster.router.probes import LinkProber
from pdcluster.router.telemetry import Telemetry

log = logging.getLogger(__name__)


class _Zones(Mapping):
    """Worker id -> its zone, read through the live loads (a dict of them, built per poll answer, cost
    O(workers) each: O(workers^2) a status round, 0.24 s of the loop at 2,000 workers)."""

    def __init__(self, loads: dict):
        self.loads = loads

    def __getitem__(self, worker_id: str) -> str:
        return self.loads[worker_id].zone

    def __iter__(self):
        return iter(self.loads)

    def __len__(self) -> int:
        return len(self.loads)


class WorkerRegistry:
    def __init__(self, cfg: RouterConfig, metrics: RouterMetrics, index: PrefixIndex, telemetry: Telemetry):
        self.cfg, self.metrics, self.index, self.telemetry = cfg, metrics, index, telemetry
        self.prefill: dict = {}                     # worker id -> PrefillClient
        self.decode: dict = {}                      # worker id -> DecodeClient
        self.loads: dict[str, WorkerLoad] = {}      # worker id -> what the router knows of it
        self._lists: dict[str, list[WorkerLoad]] = {}   # loads_of's lists, until membership changes (add / remove)
        self.background: set[asyncio.Task] = set()  # aborts sent to lost workers, link probes, polls, resyncs
        self._polls: dict[str, asyncio.Task] = {}   # worker id -> its status poll (refresh)
        self._resyncs: dict[str, asyncio.Task] = {}  # worker id -> its prefix-index resync (refresh)
        self._resynced_last: set[str] = set()       # workers whose latest task was a resync (the next is a poll)
        self.retiring: set[str] = set()             # workers retire() is scaling down (their requests migrate
                                                    #   without spending a retry: router/lifecycle/run.py)
        self.prober = LinkProber(self)
        # role -> prompt tokens charged to that pool's workers, ever (the autoscaler's
        # prefill_utilization differences it over its window); a retried placement counts again
        self.sent_tokens: dict[str, int] = {"prefill": 0, "decode": 0}
        # the owner's removal of a worker whose poll found it dead for good (WorkerGone): async (worker id),
        # deploy/scaling.py confirms and forgets it, freeing its pool slot; None: it stays, unhealthy
        self.on_gone: Callable[[str], Awaitable[None]] | None = None
        self._gone: set[str] = set()                # workers whose on_gone call is out

    # membership
    def add(self, role: str, client, zone: str = "") -> None:
        """zone: the worker's topology label (the cost model prices links inside and across zones apart)."""
        (self.prefill if role == "prefill" else self.decode)[client.worker_id] = client
        self.loads[client.worker_id] = WorkerLoad(client.worker_id, role, zone=zone)
        self._lists.clear()
        self.metrics.add_worker(client.worker_id, role)
        self.index.add_worker(client.worker_id)

    def remove(self, worker_id: str) -> None:
        """Forget a worker: clients, load, metrics, prefix index, learned rates. A request that still
        held it finds it gone and is placed again (retire makes that the exception)."""
        self.prefill.pop(worker_id, None)
        self.decode.pop(worker_id, None)
        self.loads.pop(worker_id, None)
        self._polls.pop(worker_id, None)            # (a poll or resync still out finds it gone and ends)
        self._resyncs.pop(worker_id, None)
        self._resynced_last.discard(worker_id)
        self._lists.clear()
        self.metrics.remove_worker(worker_id)
        self.index.remove_worker(worker_id)
        self.telemetry.remove_worker(worker_id)

    def ready(self) -> bool:
        """A healthy decode-capable worker, and a healthy prefill worker where prefills go remote."""
        def up(pool) -> bool:
            return any(w in self.loads and self.loads[w].healthy for w in pool)
        return up(self.decode) and (up(self.prefill) or not self.cfg.remote_prefill)

    def loads_of(self, role: str) -> list[WorkerLoad]:
        """The role's WorkerLoads in registration order: a new list each call (callers may change it),
        copied from one kept until the next add / remove (a C-speed copy, not a lookup per worker)."""
        kept = self._lists.get(role)
        if kept is None:
            kept = self._lists[role] = list(map(self.loads.__getitem__,
                                                self.prefill if role == "prefill" else self.decode))
        return kept.copy()

    def charge(self, worker_id: str, tokens: int, sign: int) -> None:
        """Count a request (and its prompt tokens queued there) on a worker (+1) or off it (-1)."""
        w = self.loads.get(worker_id)
        if w is not None:
            w.charge(sign, sign * tokens)
            if sign > 0:
                self.sent_tokens[w.role] += tokens

    async def retire(self, worker_id: str, stop, drain_timeout_s: float = 30.0,
                     migrate_timeout_s: float = 60.0) -> dict:
        """Scale one worker down without dropping a request. `stop`: async, ends the worker process.
          1. drain: it takes no new placements (WorkerLoad.draining); wait up to drain_timeout_s for
             the requests that hold it (in_flight: placing on it, prefilling or streaming) and the peer
             pulls it serves (serving_s) to finish;
          2. still busy: stop it now. Its streams end as WorkerLost, so decode requests migrate (prompt
             + tokens sent, re-prefilled elsewhere) and prefills are placed again; wait up to
             migrate_timeout_s for them to leave;
          3. remove it from the router's view, then stop it (if step 2 did not).
        Returns {"waited_s": seconds, "stopped_busy": bool, "left": requests still holding it at removal}."""
        w = self.loads[worker_id]
        w.draining = True
        self.retiring.add(worker_id)
        clock = asyncio.get_running_loop()
        t0 = clock.time()
        log.info("draining %s: %d request(s) on it, waiting up to %.0fs", worker_id, w.in_flight, drain_timeout_s)
        idle = await _wait_idle(w, drain_timeout_s)
        if not idle:
            log.warning("drain of %s: %d request(s) still running after %.1fs; stopping it, they migrate",
                        worker_id, w.in_flight, drain_timeout_s)
            await stop()
            await _wait_idle(w, migrate_timeout_s)
        left = w.in_flight
        self.remove(worker_id)
        # its id stays a while for the streams still failing over from it (run.py), then goes (ids never recur:
        # kept for good, one per scale-down ever)
        asyncio.get_running_loop().call_later(migrate_timeout_s, self.retiring.discard, worker_id)
        if idle:
            await stop()
        waited = clock.time() - t0
        log.info("removed %s after %.1fs (%s)", worker_id, waited,
                 "drained" if idle else f"stopped busy, {left} request(s) left")
        return {"waited_s": waited, "stopped_busy": not idle, "left": left}

    # health and load
    async def refresh(self, wait_s: float | None = None) -> None:
        """Poll every worker's status at once (each poll bounded by the client's health timeout):
        free KV blocks, step timings (learned rates), link figures, and its prefix-cache block events
        for the global index (resynced after a gap). A worker that misses the poll
        (dead, restarting, hung) is unhealthy, so placement skips it, until it answers again; one that
        answers with a new incarnation was restarted by Ray (max_restarts) and re-registers with an
        empty cache. Each answer is taken in when it comes, stamped with that time. wait_s: return after
        that long (the status loop's interval); a poll still out goes on and is taken in when it answers,
        and its worker is not polled again meanwhile, so one slow worker never delays the others' polls;
        so do resyncs, and a worker is not polled while its resync is out (None: wait for every poll and
        resync)."""
        clients = dict(self.prefill) | dict(self.decode)
        need = set(self.index.needs_resync())
        out = []
        for worker_id, c in clients.items():
            if not _done(self._resyncs.get(worker_id)):
                continue        # never beside its resync: events a poll drains meanwhile would be wiped by it
            t = self._polls.get(worker_id)
            if t is None or t.done():
                # a resync first, then a poll, in turns: a poll answering just past wait_s was respawned before
                # the check below every time, and the worker stayed approximate for good; and a resync that
                # keeps failing must not stop its polls (its health)
                if worker_id in need and self._resync_due(worker_id):
                    self._start_resync(worker_id, c)
                    continue
                self._resynced_last.discard(worker_id)
                t = self._polls[worker_id] = self._spawn(self._poll(worker_id, c))
            out.append(t)
        if out:
            await asyncio.wait(out, timeout=wait_s)
        now = time.time()
        self.index.expire(now)
        self.prober.probe_idle_links(now)
        for worker_id in self.index.needs_resync():
            if worker_id in clients and self._resync_due(worker_id):
                self._start_resync(worker_id, clients[worker_id])
        pending = [t for t in self._resyncs.values() if not t.done()]
        if wait_s is None and pending:      # waiting for every poll: for the resyncs too
            await asyncio.wait(pending)

    async def _poll(self, worker_id: str, client) -> None:
        try:
            s = await client.status(drain_events=True)
        except Exception as e:
            s = e
        w = self.loads.get(worker_id)
        if w is None or self.prefill.get(worker_id, self.decode.get(worker_id)) is not client:
            return              # removed (or replaced) while the poll was out
        if isinstance(s, BaseException):
            self._unhealthy(w, f"missed its status poll ({s})")
            if (isinstance(s, WorkerGone) and self.on_gone is not None and worker_id not in self._gone
                    and worker_id not in self.retiring):        # (retire removes it itself)
                self._gone.add(worker_id)
                self._spawn(self._report_gone(worker_id))
            return
        self._ingest(w, s, time.time())

    async def _report_gone(self, worker_id: str) -> None:
        """One on_gone call at a time per worker; a later poll that finds it gone again reports it again
        (the owner may not have been able to confirm it)."""
        try:
            await self.on_gone(worker_id)
        except Exception:
            log.exception("removing dead worker %s failed", worker_id)
        finally:
            self._gone.discard(worker_id)

    def _resync_due(self, worker_id: str) -> bool:
        """Its turn for a resync (one after each poll while it needs them), and neither task is out."""
        return (worker_id not in self._resynced_last and _done(self._resyncs.get(worker_id))
                and _done(self._polls.get(worker_id)))

    def _start_resync(self, worker_id: str, client) -> None:
        self._resyncs[worker_id] = self._spawn(self._resync(worker_id, client))
        self._resynced_last.add(worker_id)

    def _unhealthy(self, w: WorkerLoad, why: str) -> None:
        if w.healthy:
            log.warning("worker %s %s: unhealthy until it answers a status poll", w.worker_id, why)
        w.healthy = False
        self.metrics.worker_status(w.worker_id, None)

    async def _resync(self, worker_id: str, client) -> None:
        """The worker's cache snapshot into the index (bounded by the client's control timeout). It is not
        polled meanwhile, so the snapshot stands for the poll's health check too: not answered within the
        health timeout, the worker is unhealthy (as a missed poll makes it) until a poll answers."""
        snapshot = asyncio.ensure_future(client.cached_hashes())
        try:
            done, _ = await asyncio.wait({snapshot}, timeout=client.t.health_s)
            w = self.loads.get(worker_id)
            if not done and w is not None:
                self._unhealthy(w, f"did not answer its prefix index resync within {client.t.health_s:g}s")
            snap = await snapshot
            if worker_id not in self.loads:         # removed while the snapshot was out: nothing to index
                return
            now = time.time()
            if isinstance(snap, CacheSnapshot):
                self.index.resync(worker_id, snap.device, seq=snap.seq, now=now,
                                  lower={"host": snap.host, "disk": snap.disk})
            else:
                seq, hashes = snap
                self.index.resync(worker_id, hashes, seq=seq, now=now)
        except Exception as e:
            log.warning("prefix index resync of %s failed: %s", worker_id, e)
        finally:
            snapshot.cancel()

    def _spawn(self, coro) -> asyncio.Task:
        """A task kept in `background` until it ends (close cancels what is left)."""
        t = asyncio.ensure_future(coro)
        self.background.add(t)
        t.add_done_callback(self.background.discard)
        return t

    def _ingest(self, w: WorkerLoad, s: WorkerStatus, now: float) -> None:
        """One answered poll: health (and a restart), load figures, index events, learned rates."""
        worker_id = w.worker_id
        if w.incarnation is not None and s.incarnation != w.incarnation:
            log.warning("worker %s restarted (incarnation %s -> %s): re-registered, its prefix index reset",
                        worker_id, w.incarnation, s.incarnation)
            self.metrics.worker_restarted(worker_id)
            self.index.remove_worker(worker_id)
            self.index.add_worker(worker_id, now=now)
        elif not w.healthy:
            log.info("worker %s answers again: healthy", worker_id)
        w.incarnation = s.incarnation
        self.metrics.worker_status(worker_id, s)
        w.healthy, w.free_blocks, w.num_blocks = True, s.engine.free_blocks, s.engine.num_blocks
        w.free_cached_blocks = s.engine.free_cached_blocks
        w.links = s.links                       # per-link transfer figures, kept for placement
        w.kv_address = s.kv_address or w.kv_address
        for e in s.block_events:
            self.index.apply(worker_id, e.kind, e.hashes, seq=e.seq, now=now, tier=e.tier)
        self.index.heartbeat(worker_id, seq=s.block_seq, now=now)
        self.telemetry.ingest_status(w, s, _Zones(self.loads))

    async def while_healthy(self, aw, *worker_ids: str):
        """Await `aw` unless one of the workers is marked unhealthy (or removed) first: then
        WorkerLost naming it."""
        task = asyncio.ensure_future(aw)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.cfg.status_interval_s)
                if done:
                    return task.result()
                for worker_id in worker_ids:
                    w = self.loads.get(worker_id)
                    if w is None or not w.healthy:
                        raise WorkerLost(worker_id, "missed its health poll")
        finally:
            task.cancel()   # no-op once done

    # requests' state on the workers
    async def abort(self, request_id: str, holders, lost: str | None = None) -> None:
        """Tell every holder to abort `request_id` (frees its blocks, fences late KV), all at once. The
        lost worker's abort runs in the background and is retried for a few minutes: a hung worker
        must not delay the migration, and when it answers again the abort frees what it held (a
        worker also frees reservations nobody claims, as a last resort)."""
        async def one(h, tries: int = 1):
            for i in range(tries):
                try:
                    return await h.abort(request_id)
                except Exception as e:
                    if i == tries - 1:
                        log.warning("abort of %s on %s failed: %s", request_id, h.worker_id, e)
                    else:
                        await asyncio.sleep(min(2.0 ** i, 10.0))
        waits = []
        for h in holders:
            if h.worker_id == lost:
                self.spawn(one(h, tries=20))
            else:
                waits.append(one(h))
        await asyncio.gather(*waits)

    # background work
    def spawn(self, coro, name: str | None = None) -> asyncio.Task:
        """Run `coro` in the background until it ends or close() cancels it."""
        t = asyncio.ensure_future(coro)
        if name is not None:
            t.set_name(name)
        self.background.add(t)
        t.add_done_callback(self.background.discard)
        return t

    async def close(self) -> None:
        """Cancel the background work (abort retries, link probes): the cluster is going down."""
        tasks = list(self.background)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _done(task: asyncio.Task | None) -> bool:
    return task is None or task.done()


async def _wait_idle(w: WorkerLoad, timeout_s: float, poll_s: float = 0.05) -> bool:
    """True once no request holds `w` and no peer pull it serves is out (its serving_s charge, a float:
    a rounding residue is none); False after timeout_s."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while w.in_flight > 0 or w.serving_s > 1e-9:
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(poll_s)
    return True
