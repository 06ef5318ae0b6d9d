"""One request's life at the router: place, reserve, prefill, relay tokens, finish or clean up.

    reserve KV on decode d  ->  prefill on p (streams KV to d)  ->  first token to the client
    ->  d decodes, tokens relayed with incremental detokenization  ->  usage on the last message
On any exit that is not a normal finish (client cancel, deadline, error) every worker that holds
state for the request is told to abort, which frees its blocks.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field, replace

from pdcluster.engine.detokenizer import Detokenizer
from pdcluster.engine.hashing import block_hashes
from pdcluster.engine.rules import blocks_for_lifetime, finish_reason
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.messages import NoRoom
from pdcluster.router.admission import refusal
from pdcluster.router.cost_model import CostConfig, Telemetry
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.placement import WorkerLoad
from pdcluster.router.config import RouterConfig
from pdcluster.router.policies import make_policy
from pdcluster.router.prefix_index import PrefixIndex
from pdcluster.router.validate import InvalidRequest
from pdcluster.router.errors import WorkerLost

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """No worker can take the request (maps to UNAVAILABLE)."""


class Overloaded(Exception):
    """The admission queue is full (maps to RESOURCE_EXHAUSTED)."""


@dataclass
class Event:
    """One message for the client."""
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None        # "stop" | "length" | "abort"
    usage: dict | None = None
    placement: dict | None = None


@dataclass
class Trace:
    """What the per-request log line and the metrics need, filled in as the request goes."""
    t0: float                               # perf_counter() at admission
    t_first: float | None = None            # perf_counter() of the first event carrying a token
    placement: dict | None = None           # the first attempt's Placement fields
    decode: str | None = None               # the decode worker of the last attempt (after migrations)
    migrations: int = 0
    n_out: int = 0
    cached: int = 0
    status: str | None = None               # a finish reason, "cancelled", "unavailable" or "error"


@dataclass
class Pools:
    prefill: dict = field(default_factory=dict)   # worker id -> PrefillClient
    decode: dict = field(default_factory=dict)    # worker id -> DecodeClient
    loads: dict = field(default_factory=dict)     # worker id -> WorkerLoad


class Router:
    def __init__(self, cfg: RouterConfig, tokenizer, eos_token_ids: tuple[int, ...], max_context: int,
                 pools: Pools, metrics: RouterMetrics | None = None, cost_config: CostConfig | None = None):
        self.cfg = cfg
        self.metrics = metrics if metrics is not None else RouterMetrics()
        self.tokenizer = tokenizer
        self.eos = tuple(eos_token_ids)
        self.max_context = max_context
        self.pools = pools
        # the global prefix index (fed by the workers' block events) and learned rates
        self.index = PrefixIndex()
        self.telemetry = Telemetry(cost_config or CostConfig(block_size=cfg.block_size))
        self.policy = make_policy(cfg.policy, index=self.index, telemetry=self.telemetry,
                                  local_prefill_max_tokens=cfg.local_prefill_max_tokens,
                                  remote_prefill=cfg.remote_prefill,
                                  **({"config": cost_config} if cost_config and cfg.policy == "cost-model" else {}))
        self.in_flight: set[str] = set()
        self._background: set[asyncio.Task] = set()   # aborts sent to lost workers, link probes
        self._probed_at: dict[tuple[str, str], float] = {}   # (prefill, decode) -> time.time() of its last probe

    # pools
    def add_worker(self, role: str, client, zone: str = "") -> None:
        """zone: the worker's topology label (the cost model prices links inside and across zones apart)."""
        (self.pools.prefill if role == "prefill" else self.pools.decode)[client.worker_id] = client
        self.pools.loads[client.worker_id] = WorkerLoad(client.worker_id, role, zone=zone)
        self.metrics.add_worker(client.worker_id, role)
        self.index.add_worker(client.worker_id)

    def ready(self) -> bool:
        return bool(self.pools.decode) and (bool(self.pools.prefill) or not self.cfg.remote_prefill)

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker: pools, loads, metrics, prefix index, learned rates. A request that still
        held it finds it gone and is placed again (retire_worker makes that the exception)."""
        self.pools.prefill.pop(worker_id, None)
        self.pools.decode.pop(worker_id, None)
        self.pools.loads.pop(worker_id, None)
        self.metrics.remove_worker(worker_id)
        self.index.remove_worker(worker_id)
        self.telemetry.remove_worker(worker_id)

    async def retire_worker(self, worker_id: str, stop, drain_timeout_s: float = 30.0,
                            migrate_timeout_s: float = 60.0) -> dict:
        """Scale one worker down without dropping a request. `stop`: async, ends the worker process.
          1. drain: it takes no new placements (WorkerLoad.draining); wait up to drain_timeout_s for
             the requests that hold it (in_flight: placing on it, prefilling or streaming) to finish;
          2. still busy: stop it now. Its streams end as WorkerLost, so decode requests migrate (prompt
             + tokens sent, re-prefilled elsewhere) and prefills are placed again; wait up to
             migrate_timeout_s for them to leave;
          3. remove it from the router's view, then stop it (if step 2 did not).
        Returns {"waited_s": seconds, "stopped_busy": bool, "left": requests still holding it at removal}."""
        w = self.pools.loads[worker_id]
        w.draining = True
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        log.info("draining %s: %d request(s) on it, waiting up to %.0fs", worker_id, w.in_flight, drain_timeout_s)
        idle = await self._wait_idle(w, drain_timeout_s)
        if not idle:
            log.warning("drain of %s: %d request(s) still running after %.1fs; stopping it, they migrate",
                        worker_id, w.in_flight, drain_timeout_s)
            await stop()
            await self._wait_idle(w, migrate_timeout_s)
        left = w.in_flight
        self.remove_worker(worker_id)
        if idle:
            await stop()
        waited = loop.time() - t0
        log.info("removed %s after %.1fs (%s)", worker_id, waited,
                 "drained" if idle else f"stopped busy, {left} request(s) left")
        return {"waited_s": waited, "stopped_busy": not idle, "left": left}

    @staticmethod
    async def _wait_idle(w: WorkerLoad, timeout_s: float, poll_s: float = 0.05) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while w.in_flight > 0:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    async def refresh_loads(self) -> None:
        """Poll every worker's status at once (each poll bounded by the client's health timeout):
        free KV blocks, step timings (learned rates), link figures, and its prefix-cache block events
        for the global index (resynced after a gap). A worker that misses the poll (dead, restarting,
        hung) is unhealthy, so placement skips it, until it answers again; one that answers with a new
        incarnation was restarted by Ray (max_restarts) and re-registers with an empty cache."""
        now = time.time()
        clients = dict(self.pools.prefill) | dict(self.pools.decode)
        polls = await asyncio.gather(*(c.status(drain_events=True) for c in clients.values()), return_exceptions=True)
        for (wid, c), s in zip(clients.items(), polls):
            w = self.pools.loads.get(wid)
            if w is None:      # removed while the poll was out
                continue
            if isinstance(s, BaseException):
                if w.healthy:
                    log.warning("worker %s missed its status poll (%s): unhealthy until it answers", wid, s)
                w.healthy = False
                self.metrics.worker_status(wid, None)
                continue
            inc = s.get("incarnation")
            if w.incarnation is not None and inc != w.incarnation:
                log.warning("worker %s restarted (incarnation %s -> %s): re-registered, its prefix index reset",
                            wid, w.incarnation, inc)
                self.metrics.worker_restarted(wid)
                self.index.remove_worker(wid)
                self.index.add_worker(wid, now=now)
            elif not w.healthy:
                log.info("worker %s answers again: healthy", wid)
            w.incarnation = inc
            self.metrics.worker_status(wid, s)
            w.healthy, w.free_blocks, w.num_blocks = True, s.get("free_blocks", 0), s.get("num_blocks", 1)
            w.links = tuple(s.get("links", ()))   # per-link transfer figures, kept for placement
            w.kv_address = s.get("kv_address", w.kv_address)
            for seq, kind, hashes in s.get("block_events", ()):
                self.index.apply(wid, kind, hashes, seq=seq, now=now)
            self.index.heartbeat(wid, seq=s.get("block_seq"), now=now)
            self.telemetry.ingest_status(w, s, {k: v.zone for k, v in self.pools.loads.items()})
        self.index.expire(now)
        self._probe_idle_links(now)
        for wid in self.index.needs_resync():
            if wid in clients:
                try:
                    seq, hashes = await clients[wid].cached_hashes()
                    self.index.resync(wid, hashes, seq=seq, now=now)
                except Exception as e:
                    log.warning("prefix index resync of %s failed: %s", wid, e)

    # requests
    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str = "",
                       cache_salt: str | None = None, deadline_s: float | None = None):
        """Async iterator of Events. Raises InvalidRequest / Overloaded / Unavailable before the
        first event; after it, failures end the stream with finish_reason "abort". deadline_s: the
        client's remaining time (None: none set)."""
        rid = request_id or uuid.uuid4().hex
        if rid in self.in_flight:
            raise InvalidRequest(f"request_id {rid!r} is already in flight", code="ALREADY_EXISTS")
        self._check_capacity(len(prompt_ids), params.max_tokens)
        if len(self.in_flight) >= self.cfg.max_in_flight:
            self.metrics.rejected("overloaded")
            raise Overloaded(f"admission queue full ({self.cfg.max_in_flight} requests in flight)")
        self._admit_by_wait(len(prompt_ids), deadline_s)
        self.in_flight.add(rid)
        trace = Trace(time.perf_counter())
        self.metrics.admitted()
        run = self._run(rid, prompt_ids, params, cache_salt, trace)
        try:
            async for ev in run:
                if trace.t_first is None and ev.token_ids:
                    trace.t_first = time.perf_counter()
                    self.metrics.first_token(trace.t_first - trace.t0)
                if ev.finish_reason:
                    trace.status = ev.finish_reason
                yield ev
        except (asyncio.CancelledError, GeneratorExit):
            trace.status = trace.status or "cancelled"
            raise
        except Unavailable:
            trace.status = "unavailable"
            raise
        finally:
            trace.status = trace.status or "error"
            self.in_flight.discard(rid)
            await run.aclose()   # run's own cleanup (aborts on the workers) before the figures are final
            e2e = time.perf_counter() - trace.t0
            ttft = trace.t_first - trace.t0 if trace.t_first is not None else None
            self.metrics.finished(trace.status, ttft, e2e, trace.n_out)
            self._log(rid, trace, len(prompt_ids), ttft, e2e)

    def _admit_by_wait(self, n_prompt: int, deadline_s: float | None) -> None:
        """Overloaded (RESOURCE_EXHAUSTED) now when the prompt's prefill could not start within
        --max-queue-wait, or its first token not come within the client's deadline
        (router/admission.py)."""
        c = self.cfg
        if c.max_queue_wait_s is None and deadline_s is None:
            return
        may_prefill = list(self._loads("prefill")) if c.remote_prefill else []
        if not c.remote_prefill or c.policy == "cost-model" or n_prompt <= c.local_prefill_max_tokens:
            may_prefill += list(self._loads("decode"))          # a local prefill is an option too
        why = refusal(may_prefill, self.telemetry.prefill_tps, n_prompt, c.max_queue_wait_s, deadline_s)
        if why:
            self.metrics.rejected("overloaded")
            raise Overloaded(why)

    def _check_capacity(self, n_prompt: int, max_tokens: int) -> None:
        """InvalidRequest when no decode worker's KV pool (as last reported) can ever hold the
        request: its worker would refuse it on every placement."""
        sizes = [w.num_blocks for w in self._loads("decode") if w.capacity_known]
        need = blocks_for_lifetime(n_prompt, max_tokens, self.cfg.block_size)    # the workers' own rule
        if sizes and need > max(sizes):
            raise InvalidRequest(f"prompt ({n_prompt} tokens) + sampling.max_tokens ({max_tokens}) needs {need} KV "
                                 f"blocks of {self.cfg.block_size} tokens; the largest decode worker holds "
                                 f"{max(sizes)}")

    async def _place(self, wid: str, ids: list[int], pd: dict, salt: str | None, exclude: set[str]):
        """Reserve + prefill (remote) or start a local prefill, trying placements until one works.
        Returns (stream or None, first token or None, placement dict, holders, cached tokens)."""
        hashes = block_hashes(ids, self.cfg.block_size, salt)   # once per placement, not per attempt
        for _ in range(self.cfg.max_attempts):
            dec = self.policy.choose(len(ids), list(self._loads("prefill")), list(self._loads("decode")), exclude,
                                     hashes=hashes, now=time.time())
            if dec is None:
                break
            d = self.pools.decode[dec.decode]
            # the workers that will cache this prompt's blocks hold them from now on, tentatively:
            # the next prompts with this prefix follow instead of racing elsewhere
            for w in {dec.decode, dec.prefill or dec.decode}:
                self.index.expect(w, hashes, time.time())
            if dec.kind == "local":
                placement = dict(prefill_worker=dec.decode, decode_worker=dec.decode, remote_prefill=False,
                                 kv_bytes_transferred=0, kv_transfer_ms=0.0)
                queued = max(0, len(ids) - int((dec.estimate or {}).get("cached_tokens", 0)))
                return (self._queued_until_first(d.stream(wid, None, ids, pd, salt), dec.decode, queued),
                        None, placement, [d], 0)
            p = self.pools.prefill[dec.prefill]
            self._charge(dec.decode, 0, +1)   # from the reserve on the request holds d: a drain waits for it
            # charged to the prefill worker from the choice on, before the first await: a burst's next
            # admission and placement see this prompt in its backlog (router/admission.py)
            self._charge(dec.prefill, len(ids), +1)
            try:
                try:
                    r = await d.reserve(wid, ids, pd, salt)
                except WorkerLost as e:
                    log.warning("reserve of %s: %s; placing again", wid, e)
                    exclude.add(dec.decode)
                    continue
                if isinstance(r, NoRoom):
                    exclude.add(dec.decode)
                    continue
                try:
                    dest = r.destination()
                    # the transfer needs both ends: either worker missing its health poll (hung,
                    # dead) ends the attempt now rather than at the prefill timeout
                    pre = await self._while_healthy(p.prefill(wid, ids, pd, dest, salt), dec.decode, dec.prefill)
                except Exception as e:   # lost worker, failed or corrupted transfer: recompute elsewhere
                    lost = e.worker_id if isinstance(e, WorkerLost) else None
                    log.warning("prefill of %s on %s failed (%s); placing again", wid, dec.prefill, e)
                    await self._abort_all(wid, [d, p], lost=lost)
                    exclude.add(lost or dec.prefill)
                    continue
                placement = dict(prefill_worker=dec.prefill, decode_worker=dec.decode, remote_prefill=True,
                                 kv_bytes_transferred=pre.kv_bytes, kv_transfer_ms=pre.kv_transfer_ms)
                return None, pre.first_token, placement, [d, p], pre.cached_tokens
            finally:
                self._charge(dec.prefill, len(ids), -1)
                self._charge(dec.decode, 0, -1)
        raise Unavailable(f"no worker could take request {wid} (excluded: {sorted(exclude) or 'none ready'})")

    async def _run(self, rid: str, ids: list[int], params: SamplingParams, salt: str | None, trace: Trace):
        """Place, stream, and on a lost decode worker migrate: re-prefill prompt + the tokens the
        client already has on another worker and continue, so the client sees no gap and no repeat."""
        detok = Detokenizer(self.tokenizer, ids, params.stop)
        out: list[int] = []          # tokens already sent to the client
        exclude: set[str] = set()
        holders: list = []           # workers that may hold state for the current attempt
        cached, attempt, wid = 0, 0, rid
        first_message, finished = True, False
        try:
            while True:
                wid = rid if attempt == 0 else f"{rid}#m{attempt}"   # worker-side id of this attempt
                p_now = replace(params, max_tokens=params.max_tokens - len(out))
                try:
                    stream, first, placement, holders, c = await self._place(
                        wid, ids + out, dataclasses.asdict(p_now), salt, exclude)
                except Unavailable:
                    if not out:
                        raise
                    finished = True
                    yield Event([], detok.flush(), "abort", self._usage(ids, len(out), cached))
                    return
                if attempt == 0:
                    cached = c
                    trace.placement = placement
                self.metrics.placed("remote" if placement["remote_prefill"] else "local")
                dw = placement["decode_worker"]
                trace.decode, trace.migrations = dw, attempt
                self._charge(dw, 0, +1)
                try:
                    if first is not None:   # remote prefill: the first token came from the prefill worker
                        out.append(first)
                        text = detok.push([first])
                        reason = "stop" if detok.stopped else finish_reason(   # the engine's own rule
                            first, len(out), len(ids) + len(out), params, self.eos, self.max_context)
                        if reason:
                            finished = True
                            await self._abort_all(wid, holders[:1])
                            yield Event([first], text + detok.flush(), reason, self._usage(ids, len(out), cached),
                                        placement if first_message else None)
                            return
                        yield Event([first], text, None, None, placement if first_message else None)
                        first_message = False
                        stream = self.pools.decode[dw].stream(wid, first)
                    async for item in stream:
                        toks = item.token_ids
                        if not cached and item.num_cached_tokens and attempt == 0:
                            cached = item.num_cached_tokens
                        out += toks
                        text = detok.push(toks) if toks else ""
                        reason = item.finish_reason if item.finished else None
                        if detok.stopped and reason is None:
                            reason = "stop"
                            await self._abort_all(wid, holders[:1])
                        if reason:
                            finished = True
                            text += detok.flush()
                        yield Event(toks, text, reason, self._usage(ids, len(out), cached) if reason else None,
                                    placement if first_message else None)
                        first_message = False
                        if reason:
                            return
                    raise WorkerLost(dw, "stream ended without a finish")
                except Exception as e:
                    # a lost decode worker (or a failed start, e.g. KV that never completed): migrate
                    attempt += 1
                    lost = e.worker_id if isinstance(e, WorkerLost) else None
                    log.warning("request %s: %s; migrating with %d tokens sent (attempt %d)", rid, e, len(out),
                                attempt)
                    if lost:
                        exclude.add(lost)
                    await self._abort_all(wid, holders, lost=lost)
                    holders = []
                    if attempt > self.cfg.max_migrations:
                        if not out:
                            raise Unavailable(f"request {rid}: every retry spent ({e})") from None
                        finished = True
                        yield Event([], detok.flush(), "abort", self._usage(ids, len(out), cached))
                        return
                finally:
                    self._charge(dw, 0, -1)
        finally:
            if not finished and holders:
                await asyncio.shield(self._abort_all(wid, holders))
            trace.n_out, trace.cached = len(out), cached

    async def _queued_until_first(self, stream, wid: str, tokens: int):
        """A local prefill's uncached prompt tokens count in its decode worker's queue (what the
        cost model reads as that worker's prefill backlog) until the first item: prefill done."""
        w = self.pools.loads.get(wid)
        if w is not None:
            w.queued_tokens += tokens
        try:
            async for item in stream:
                if tokens and w is not None:
                    w.queued_tokens -= tokens
                tokens = 0
                yield item
        finally:
            if tokens and w is not None:
                w.queued_tokens -= tokens

    async def close(self) -> None:
        """Cancel the background work (abort retries, link probes): the cluster is going down."""
        tasks = list(self._background)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _probe_idle_links(self, now: float) -> None:
        """Links with no transfer for probe_after_s (or never measured) get a probe from their
        prefill worker, in the background: one probe per idle prefill worker at a time, never while
        it has requests (a busy link is measured by its transfers). Its sample reaches the link
        table with that worker's next status poll."""
        loads = self.pools.loads
        busy = {t.get_name() for t in self._background}
        idle = [p for p, c in self.pools.prefill.items()
                if loads[p].placeable and loads[p].in_flight == 0 and f"probe:{p}" not in busy]
        dsts = [d for d in self.pools.decode if loads[d].placeable and loads[d].kv_address]
        every = self.telemetry.cfg.probe_after_s
        for p in idle:
            wanted = [(p, d) for _, d in self.telemetry.links.probes_needed([p], dsts, now)
                      if now - self._probed_at.get((p, d), -every) >= every]   # at most once per period
            if wanted:
                d = wanted[0][1]
                self._probed_at[(p, d)] = now
                t = asyncio.ensure_future(self._probe(p, d, loads[d].kv_address))
                t.set_name(f"probe:{p}")
                self._background.add(t)
                t.add_done_callback(self._background.discard)

    async def _probe(self, p: str, d: str, address: str) -> None:
        client = self.pools.prefill.get(p)
        try:
            bps = await client.probe(address, d) if client is not None else None
        except Exception as e:
            log.info("probe of link %s -> %s failed: %s", p, d, e)
            return
        if bps:
            log.debug("probe of link %s -> %s: %.1f MB/s", p, d, bps / 1e6)

    async def _while_healthy(self, aw, *wids: str):
        """Await `aw` unless one of the workers `wids` is marked unhealthy (or removed) first: then
        WorkerLost naming it."""
        task = asyncio.ensure_future(aw)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.cfg.status_interval_s)
                if done:
                    return task.result()
                for wid in wids:
                    w = self.pools.loads.get(wid)
                    if w is None or not w.healthy:
                        raise WorkerLost(wid, "missed its health poll")
        finally:
            task.cancel()   # no-op once done

    def _loads(self, role: str):
        pool = self.pools.prefill if role == "prefill" else self.pools.decode
        return (self.pools.loads[w] for w in pool)

    def _charge(self, wid: str, tokens: int, sign: int) -> None:
        w = self.pools.loads.get(wid)
        if w is not None:
            w.in_flight += sign
            w.queued_tokens += sign * tokens

    async def _abort_all(self, rid: str, holders, lost: str | None = None) -> None:
        """Tell every holder to abort `rid` (frees its blocks, fences late KV), all at once. The lost
        worker's abort runs in the background and is retried for a few minutes: a hung worker must
        not delay the migration, and when it answers again the abort frees what it held (a worker
        also frees reservations nobody claims, as a last resort)."""
        async def one(h, tries: int = 1):
            for i in range(tries):
                try:
                    return await h.abort(rid)
                except Exception as e:
                    if i == tries - 1:
                        log.warning("abort of %s on %s failed: %s", rid, h.worker_id, e)
                    else:
                        await asyncio.sleep(min(2.0 ** i, 10.0))
        waits = []
        for h in holders:
            if h.worker_id == lost:
                t = asyncio.ensure_future(one(h, tries=20))
                self._background.add(t)
                t.add_done_callback(self._background.discard)
            else:
                waits.append(one(h))
        await asyncio.gather(*waits)

    @staticmethod
    def _usage(ids, n_out, cached) -> dict:
        return dict(prompt_tokens=len(ids), completion_tokens=n_out, cached_prompt_tokens=cached)

    def _log(self, rid: str, trace: Trace, n_in: int, ttft_s: float | None, e2e_s: float) -> None:
        """One logfmt line per request at its end (also attached as `record.request` for JSON handlers)."""
        p = trace.placement or {}
        rec = dict(id=rid, status=trace.status, prefill=p.get("prefill_worker", "-"),
                   decode=trace.decode or p.get("decode_worker", "-"), migrations=trace.migrations,
                   kind=("remote" if p.get("remote_prefill") else "local") if p else "-",
                   prompt=n_in, completion=trace.n_out, cached=trace.cached,
                   ttft_ms=round(ttft_s * 1e3, 1) if ttft_s is not None else None, e2e_ms=round(e2e_s * 1e3, 1))
        log.info("request done %s", " ".join(f"{k}={'-' if v is None else v}" for k, v in rec.items()),
                 extra={"request": rec})
