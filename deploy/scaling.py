"""Add and retire worker replicas while serving, and run the pool autoscaler on the router's view.

The scaling half of `deploy.launch.Cluster` (a mixin); the policy is router/autoscaler.py.

    add_replica(role)       spawn an actor asking for one unit of the pool's Ray resource (on a `ray up`
                            cluster an actor nobody can place makes Ray's autoscaler launch a node of
                            that type), wait until it has loaded the model, register it with the router
    remove_replica(role)    Router.retire_worker: drain (no new placements, running requests finish or,
                            after drain_timeout_s, migrate), forget it, shut the actor down, ray.kill it
    forget_dead(worker_id)  a worker whose status poll found its actor dead for good (no Ray restart left:
                            router.errors.WorkerGone) leaves the router and the pool, so it no longer holds
                            a slot under max_replicas; the autoscaler, if it sizes that pool, replaces it by
                            its rules, else replace_dead does (a fixed pool keeps its size)
    start_autoscaler(...)   PoolAutoscaler as a task: reads pool_metrics(), calls the two above

One source of truth: placement and the autoscaler both read `router.workers.loads` (the WorkerLoads
refreshed by the status poll and charged per request) and the router's metrics.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Mapping

log = logging.getLogger(__name__)

# replace_dead's back-off, per chain of replacements (a dead worker, its replacement, that one's, ...): a
# replacement that dies within SHORT_LIFE_S of joining (or fails to start) doubles its chain's wait before the
# next one, from BACKOFF_MIN_S up to BACKOFF_MAX_S; a longer life ends the chain (the next death: at once).
# Chains are apart: another worker's death, or a second crash loop, neither resets nor shares one's wait.
SHORT_LIFE_S, BACKOFF_MIN_S, BACKOFF_MAX_S = 60.0, 1.0, 60.0


def kill_soon(handle) -> None:
    """ray.kill(handle) on a thread, not awaited: it waits on the GCS's reply (RPC timeouts when that is slow), and
    the router's event loop serves every client meanwhile; callable where the caller is being cancelled."""
    import ray

    def done(f) -> None:
        if not f.cancelled() and f.exception() is not None:
            log.warning("killing an actor failed: %r", f.exception())
    asyncio.get_running_loop().run_in_executor(None, ray.kill, handle).add_done_callback(done)


def _doubled(delay: float) -> float:
    """A chain's next wait after `delay` (s)."""
    return min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, 2 * delay))


class Scaling:
    """Mixed into Cluster; uses its cfg, router, actors, timeouts, engine_kwargs, worker_kwargs, starting,
    _next_index."""

    def _spawn(self, role: str, wid: str, tier_key: str | None = None):
        """A `role` worker actor (loading asynchronously); every spawn of a role gets the same arguments but
        its disk tier's subdirectory, tier_key (None: its id)."""
        from pdcluster.decode_worker import actor as decode_actor
        from pdcluster.prefill_worker import actor as prefill_actor
        spawn = prefill_actor.spawn if role == "prefill" else decode_actor.spawn
        e = self.cfg.engine
        kw = self.worker_kwargs[role] | ({"tier_key": tier_key} if tier_key not in (None, wid) else {})
        return spawn(wid, self.engine_kwargs[role], self.cfg.threads(role), e.use_gpu, **kw)

    # Disk tier subdirectories (kv_transfer/tiers/attach.py) by key: a worker's is its id, unless it took over
    # one that a worker gone for good (retired, or dead) left: so a node keeps at most as many as the role had
    # workers at once, not one per worker ever started, and the taker comes back warm (its scan verifies).
    def _take_tier_key(self, role: str, wid: str) -> str:
        free = self.free_tier_keys.setdefault(role, [])
        key = free.pop(0) if free else wid
        self.tier_keys[wid] = key
        return key

    def _leave_tier_key(self, role: str, wid: str) -> None:
        self.free_tier_keys.setdefault(role, []).append(self.tier_keys.pop(wid, wid))

    async def add_replica(self, role: str) -> str:
        """One more `role` worker, registered once loaded; returns its id. A replica that does not load
        within cfg.replica_start_timeout_s is killed and the call raises (the pool stays as it was)."""
        from pdcluster.router.workers import DecodeClient, PrefillClient
        client = PrefillClient if role == "prefill" else DecodeClient
        bound = self.cfg.pools.replica_start_timeout_s
        wid = f"{role}-{self._next_index[role]}"
        self._next_index[role] += 1
        key = self._take_tier_key(role, wid)
        try:
            h = self.starting[wid] = self._spawn(role, wid, key)
        except BaseException:                       # (Ray refused the actor): no worker holds the key
            self._leave_tier_key(role, wid)
            raise
        log.info("adding %s: waiting for a free %s_pool slot and the model load (up to %.0fs)", wid, role, bound)
        try:
            await asyncio.wait_for(h.status.remote(), bound)
        except BaseException as e:
            kill_soon(h)
            self._leave_tier_key(role, wid)
            why = (f"not placed and loaded within {bound:.0f}s: does the Ray cluster have "
                   f"(or can its autoscaler launch) a node with a free {role}_pool unit?"
                   if isinstance(e, asyncio.TimeoutError) else repr(e))
            log.error("adding %s failed, killed it: %s", wid, why)
            if isinstance(e, Exception):
                raise RuntimeError(f"{wid}: {why}") from None
            raise
        finally:
            self.starting.pop(wid, None)
        self.actors[wid] = h
        self.router.add_worker(role, client(wid, h, self.timeouts), zone=self.cfg.pools.pool(role).zone)
        log.info("added %s: the %s pool has %d workers", wid, role, len(self._pool(role)))
        return wid

    async def remove_replica(self, role: str, worker_id: str | None = None) -> str:
        """Retire one `role` worker (default: the non-draining one with the fewest requests, newest on
        ties) without dropping a request; returns its id. Never retires the pool's last live worker."""
        loads = self.router.workers.loads
        live = [w for w in loads.values() if w.role == role and not w.draining]
        if worker_id is None:
            if len(live) <= 1:
                raise RuntimeError(f"not removing the last live {role} worker")
            worker_id = min(live, key=lambda w: (w.in_flight, -int(w.worker_id.rsplit("-", 1)[1]))).worker_id
        h = self.actors[worker_id]

        async def stop():
            try:
                await asyncio.wait_for(h.shutdown.remote(), 10.0)
            except Exception as e:
                log.warning("shutdown of %s: %r; killing it", worker_id, e)
            kill_soon(h)
            self.actors.pop(worker_id, None)

        await self.router.retire_worker(worker_id, stop, drain_timeout_s=self.cfg.pools.drain_timeout_s,
                                        migrate_timeout_s=self.cfg.timeouts.stream_gap_s)
        self._leave_tier_key(role, worker_id)
        self.replaced.pop(worker_id, None)
        log.info("removed %s: the %s pool has %d workers", worker_id, role, len(self._pool(role)))
        return worker_id

    async def forget_dead(self, worker_id: str) -> None:
        """The registry's on_gone: confirm with a fresh call that the actor is dead (a dead actor answers
        ActorDiedError at once; one restarting would queue the call and answer), then forget it."""
        import ray
        h = self.actors.get(worker_id)
        if h is None:
            return
        try:
            await asyncio.wait_for(h.status.remote(), self.timeouts.health_s)
            return                                  # it answers: not dead (its next poll sees it healthy)
        except ray.exceptions.ActorDiedError:
            pass
        except Exception as e:                      # no answer in time, or restarting: the polls go on
            log.info("%s: not confirmed dead (%r); still polled", worker_id, e)
            return
        w = self.router.workers.loads.get(worker_id)
        if self.actors.get(worker_id) is not h or w is None or worker_id in self.router.workers.retiring:
            return                                  # removed or retiring meanwhile
        role = w.role
        self.actors.pop(worker_id)
        self.router.workers.remove(worker_id)
        self.router.metrics.dead.labels(role).inc()
        self._leave_tier_key(role, worker_id)
        log.error("%s is dead (no Ray restart left, max_restarts=%d): removed from the %s pool, which has %d "
                  "workers now", worker_id, self.cfg.pools.max_restarts, role, len(self._pool(role)))
        if self.autoscaler is None or role not in self.autoscaler.policies:
            self.replace_dead(role, worker_id)

    def replace_dead(self, role: str, worker_id: str) -> None:
        """Start a fresh `role` worker in place of dead `worker_id` (a task: the status poll that found
        it dead goes on). At once, unless `worker_id` was itself a replacement that died young: then after
        twice its chain's last wait; a start that fails is retried likewise until one joins or the cluster stops."""
        joined, waited = self.replaced.pop(worker_id, (None, 0.0))
        if self.stopping:
            return
        young = joined is not None and time.monotonic() - joined < SHORT_LIFE_S
        delay = _doubled(waited) if young else 0.0
        t = asyncio.ensure_future(self._replace(role, worker_id, delay))
        self.replacing.add(t)
        t.add_done_callback(self.replacing.discard)

    async def _replace(self, role: str, dead: str, delay: float) -> None:
        while True:
            if delay:
                log.info("replacing dead %s in %.0fs", dead, delay)
                await asyncio.sleep(delay)
            try:
                wid = await self.add_replica(role)
            except Exception as e:                  # add_replica logged why; try again, later
                delay = _doubled(delay)
                log.error("replacing dead %s failed (%s); next try in %.0fs", dead, e, delay)
                continue
            self.replaced[wid] = (time.monotonic(), delay)
            log.info("%s replaces dead %s", wid, dead)
            return

    def _pool(self, role: str) -> dict:
        return self.router.workers.prefill if role == "prefill" else self.router.workers.decode

    def pool_metrics(self) -> dict:
        """router.autoscaler.MetricsSnapshot from the router's live view (p90s over the metrics' recent window)."""
        from pdcluster.router.autoscaler import pool_metrics
        m, loads = self.router.metrics, list(self.router.workers.loads.values())
        ms = lambda s: None if s is None else s * 1e3
        starting = {r: sum(1 for w in self.starting if w.startswith(r + "-")) for r in ("prefill", "decode")}
        reg = self.router.workers
        return {"prefill": pool_metrics("prefill", loads, starting["prefill"],
                                        p90_ttft_ms=ms(m.recent_ttft.quantile(0.9)),
                                        prompt_tokens_sent=reg.sent_tokens["prefill"],
                                        prefill_tps=reg.telemetry.prefill_tps),
                "decode": pool_metrics("decode", loads, starting["decode"],
                                       p90_tpot_ms=ms(m.recent_tpot.quantile(0.9)),
                                       decode_step_s=reg.telemetry.last_step_s)}

    def start_autoscaler(self, rules: Mapping, interval_s: float = 5.0) -> None:
        """Run the pool autoscaler as a task on this event loop (rules: pool -> ScalingRule). Without
        remote prefill the prefill pool is not scaled."""
        from pdcluster.router.autoscaler import PoolAutoscaler
        rules = {p: r for p, r in rules.items() if p == "decode" or self.cfg.router.remote_prefill}
        self.autoscaler = PoolAutoscaler(rules, self.pool_metrics, self.add_replica, self.remove_replica,
                                         interval_s=interval_s, observer=self.router.metrics)
        self._autoscaler_stop = asyncio.Event()
        self._autoscaler_task = asyncio.ensure_future(self.autoscaler.run(self._autoscaler_stop))
        log.info("pool autoscaler on, every %gs: %s", interval_s,
                 "; ".join(f"{p} {r.signal} target {r.target:g} replicas [{r.min_replicas}, {r.max_replicas}]"
                           for p, r in rules.items()))

    async def stop_replacing(self) -> None:
        """Cancel replacements in flight (a replica still loading is killed by add_replica)."""
        for t in list(self.replacing):
            t.cancel()
        await asyncio.gather(*self.replacing, return_exceptions=True)

    async def stop_autoscaler(self) -> None:
        """Stop ticking; cancel the actions in flight (a replica still loading is killed, a drain stops
        where it is: the whole cluster is going down)."""
        if self._autoscaler_task is not None:
            self._autoscaler_stop.set()
            await self.autoscaler.cancel_actions()
            await self._autoscaler_task
            self._autoscaler_task = None
