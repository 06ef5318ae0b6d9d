"""The simulator: pools of instances on one simulated clock, driven by the router's own code.

What is the router's (imported, never copied): WorkerRegistry (loads, `charge`, the status-poll
ingest `_ingest` that feeds the PrefixIndex with block events and the Telemetry with step
counters), PrefixIndex (`expect` after each choice, `expire` per poll), the placement policy
(`make_policy(name).choose`, with the cost model's CostConfig built from the deployment's figures
as the router builds it from its model), RecentWindow (the p90 TTFT/TPOT the autoscaler reads),
`pool_metrics` and PoolAutoscaler (ticked on an asyncio loop whose clock is the simulator's).
What is the simulator's: the instances (sim/instances.py), links, the arrival process, and the
placement retry loop of router/lifecycle/place.py (choose, expect, reserve; NoRoom excludes that
decode worker and chooses again, up to RouterConfig.max_attempts); a request no worker takes waits
in the router (FIFO) and is placed again after the next status poll, and so does a deferred choice
(Placement.defer) until there is room or it has waited RouterConfig.place_wait_s since its arrival.
A request the router refuses (RESOURCE_EXHAUSTED) ends unserved: the policy shed it (Overloaded from
`choose`), or its first choice's expected TTFT is over RouterConfig.admit_ttft_s (the router's own
router/admission.py `slo_refusal`, as place.py checks it).
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from dataclasses import dataclass, field, replace

from prometheus_client import CollectorRegistry

from pdcluster.router.admission import slo_refusal
from pdcluster.router.autoscaler import PoolAutoscaler, ScalingRule, pool_metrics
from pdcluster.router.config import RouterConfig
from pdcluster.router.cost_config import CostConfig
from pdcluster.router.errors import Overloaded
from pdcluster.router.metrics import RecentWindow, RouterMetrics
from pdcluster.router.placement import make_policy
from pdcluster.router.prefix_index import PrefixIndex
from pdcluster.router.registry import WorkerRegistry
from pdcluster.router.telemetry import Telemetry
from pdcluster.sim.hardware import hardware
from pdcluster.sim.instances import DecodeInstance, Job, Link, PrefillInstance
from pdcluster.sim.models import model as model_profile
from pdcluster.sim.results import Record, SimResult
from pdcluster.sim.roofline import Roofline
from pdcluster.sim.trace import Request


@dataclass(frozen=True)
class PoolSpec:
    hw: str                         # sim/hardware.py name (case-insensitive)
    count: int = 1                  # instances at the start
    tp: int = 1                     # devices per instance (tensor parallel)
    zone: str = "z0"
    min_count: int | None = None    # autoscaling bounds (None: count)
    max_count: int | None = None
    host_cache_gb: float = 0.0      # per instance: GiB of its host-memory KV tier (sim/tiers.py; 0: none),
    disk_cache_gb: float = 0.0      #   and of its disk tier, as pools.yaml's kv_tiers (GiB per worker)

    def tier_blocks(self, roof: Roofline, block_tokens: int) -> dict[str, int]:
        """{tier: blocks} of one instance's lower tiers (blocks of block_tokens in the pool's layout)."""
        b = block_tokens * roof.kv_bytes_per_token
        if self.host_cache_gb < 0 or self.disk_cache_gb < 0:
            raise ValueError("host_cache_gb and disk_cache_gb must be >= 0")
        return {"host": int(self.host_cache_gb * 2**30 // b), "disk": int(self.disk_cache_gb * 2**30 // b)}


@dataclass(frozen=True)
class Topology:
    cross_zone_bps: float = 100e9 / 8      # bytes/s of the shared link between two zones (100 Gb/s Ethernet)
    cross_zone_latency_s: float = 0.005
    intra_zone_latency_s: float = 20e-6    # RDMA; bandwidth: each prefill instance's NICs (tp x hw.nic_bps)


@dataclass(frozen=True)
class SimConfig:
    model: str
    decode: PoolSpec
    prefill: PoolSpec | None = None         # None: every request prefills on its decode instance
    policy: str = "cost-model"
    policy_options: tuple = ()              # ((keyword, value), ...) for make_policy
    cost_overrides: tuple = ()              # ((CostConfig field, value), ...)
    topology: Topology = field(default_factory=Topology)
    block_tokens: int = 512                 # KV / prefix block (the trace's hash block)
    prefill_batch_tokens: int = 16384       # prompt tokens per prefill step
    local_chunk_tokens: int = 2048          # prompt tokens per step of a local (decode-side) prefill
    max_batch: int = 256                    # running sequences per decode instance
    local_prefill_max_tokens: int = 0       # simple policies: prompts this short prefill locally
    poll_s: float = RouterConfig.status_interval_s
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.05
    autoscale: tuple = ()                   # ((pool, ScalingRule), ...): PoolAutoscaler rules
    autoscale_interval_s: float = 5.0
    replica_start_s: float = 60.0           # a new replica takes placements this long after the decision
    drain_after_s: float = 1800.0           # give up on requests unfinished this long after the last arrival
    shared_host_slowdown: float = 0.0       # every instance on one host's cores: a step takes (1 + this x the
                                            #   other instances stepping) longer (sim/validate.py measures it here)
    local_batch_prompts: bool = True        # a decode step takes waiting local prompts' chunks up to
                                            #   local_chunk_tokens, FIFO (False: the head's only, before issue 20 pt 2)
    share_prefix_blocks: bool = True        # decode KV: a cached prompt block is held once (sim/instances.py
                                            #   reserve); False: every request holds all its blocks (before issue 20 pt 2)
    place_wait_s: float | None = RouterConfig.place_wait_s    # a deferred placement waits this long (None: for room)
    admit_ttft_s: float | None = RouterConfig.admit_ttft_s    # refuse a new request expected over this TTFT (None: off)

    def roofline(self, role: str) -> Roofline:
        pool = self.prefill if role == "prefill" else self.decode
        return Roofline(model_profile(self.model), hardware(pool.hw), pool.tp)


def cost_config(cfg: SimConfig) -> CostConfig:
    """The cost model's configuration for this deployment, as the router derives it from its model
    (CostConfig.for_model) plus priors from the rooflines and the link figures."""
    m, d = model_profile(cfg.model), cfg.roofline("decode")
    p = cfg.roofline("prefill") if cfg.prefill else d
    base_s = d.decode_s(1, 0)
    kw = dict(block_size=cfg.block_tokens, kv_bytes_per_token=p.kv_bytes_per_token, num_layers=m.layers,
              num_kv_heads=m.kv_heads, kv_dtype_bytes=p.hw.dtype_bytes,
              prior_prefill_tps=p.prefill_tps(), prior_local_prefill_tps=d.prefill_tps(cfg.local_chunk_tokens),
              prior_decode_base_s=base_s, prior_decode_per_seq_s=max(d.decode_s(33, 32 * 4096) - base_s, 0.0) / 32,
              intra_zone_bps=p.tp * p.hw.nic_bps, cross_zone_bps=cfg.topology.cross_zone_bps,
              local_chunk_tokens=cfg.local_chunk_tokens, tpot_slo_s=cfg.slo_tpot_s,
              # the operator's priors for the tiers' load rates (one per router, as the real CostConfig):
              # the prefill pool's per-instance rates; Telemetry then learns each worker's own
              prior_host_load_bps=p.tp * p.hw.host_load_bps, prior_disk_load_bps=p.tp * p.hw.disk_load_bps)
    return replace(CostConfig(**kw), **dict(cfg.cost_overrides))


class _Worker:
    """What the registry keeps as a worker's client: only its id (the simulator makes no calls)."""
    def __init__(self, worker_id: str):
        self.worker_id = worker_id


class Simulator:
    def __init__(self, cfg: SimConfig, requests: list[Request], policy=None, progress: bool = False):
        self.cfg, self.requests, self.progress = cfg, requests, progress
        self.model = model_profile(cfg.model)
        self.rooflines = {"decode": cfg.roofline("decode")}
        if cfg.prefill is not None:
            self.rooflines["prefill"] = cfg.roofline("prefill")
        self.now = 0.0
        self._heap: list = []
        self._seq = itertools.count()
        # the router
        self.cost_cfg = cost_config(cfg)
        if self.cost_cfg.peer_pull:     # its instances compute every block the router would have them pull
            raise ValueError("the simulator does not model peer pulls: leave cost_overrides' peer_pull off")
        self.index = PrefixIndex()
        self.telemetry = Telemetry(self.cost_cfg)
        self.rcfg = RouterConfig(block_size=cfg.block_tokens, remote_prefill=cfg.prefill is not None,
                                 local_prefill_max_tokens=cfg.local_prefill_max_tokens, policy=cfg.policy,
                                 place_wait_s=cfg.place_wait_s, admit_ttft_s=cfg.admit_ttft_s)
        self.registry = WorkerRegistry(self.rcfg, RouterMetrics(CollectorRegistry()), self.index, self.telemetry)
        self.policy = policy if policy is not None else make_policy(
            cfg.policy, index=self.index, telemetry=self.telemetry, config=self.cost_cfg,
            local_prefill_max_tokens=cfg.local_prefill_max_tokens, remote_prefill=cfg.prefill is not None,
            **dict(cfg.policy_options))
        self.recent_ttft = RecentWindow(30.0, clock=lambda: self.now)
        self.recent_tpot = RecentWindow(30.0, clock=lambda: self.now)
        # the fleet
        self.inst: dict = {}
        self.retired: list = []
        self.links: dict[tuple[str, str], Link] = {}
        self._next = {"prefill": 0, "decode": 0}
        self.starting = {"prefill": 0, "decode": 0}
        self._drains: dict[str, asyncio.Future] = {}
        self.pending: list[Job] = []
        self.records: dict[int, Record] = {}
        self.done = 0
        self.placements = 0
        self.router_waits = 0           # requests that waited in the router for a worker with room
        self.scale_log: list[tuple[float, str, int, int]] = []      # (time, pool, delta, replicas after)
        for role in ("prefill", "decode"):
            pool = cfg.prefill if role == "prefill" else cfg.decode
            for _ in range(pool.count if pool else 0):
                self._add_instance(role, 0.0, 0.0)
        self.autoscaler = None
        if cfg.autoscale:
            self.loop = asyncio.new_event_loop()
            self.autoscaler = PoolAutoscaler(dict(cfg.autoscale), self._pool_metrics, self._add_replica,
                                             self._drain_replica, clock=lambda: self.now,
                                             interval_s=cfg.autoscale_interval_s)
            logging.getLogger("pdcluster.router.autoscaler").setLevel(logging.WARNING)

    # the clock
    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, args))

    def run(self) -> SimResult:
        from tqdm import tqdm
        for r in self.requests:
            self.at(r.arrival_s, self._arrive, r)
        self.at(0.0, self._poll)
        if self.autoscaler is not None:
            self.at(0.0, self._autoscale_tick)
        last = max((r.arrival_s for r in self.requests), default=0.0)
        self._give_up_at = last + self.cfg.drain_after_s
        bar = tqdm(total=len(self.requests), desc="simulate", unit="req", disable=not self.progress, mininterval=0.5)
        shown = 0
        while self._heap and self.done < len(self.requests):
            t, _, fn, args = heapq.heappop(self._heap)
            if t > self._give_up_at:
                break
            self.now = t
            fn(t, *args)
            if self.done - shown >= 200:
                bar.update(self.done - shown)
                shown = self.done
        bar.update(self.done - shown)
        bar.close()
        if self.autoscaler is not None:     # actions still waiting on simulated time end with the run
            self.loop.run_until_complete(self.autoscaler.cancel_actions())
            self.loop.close()
        end = self.now
        insts = list(self.inst.values()) + self.retired
        gpu_h = sum(((i.stopped_at if i.stopped_at is not None else end) - i.started_at) * i.roof.tp
                    for i in insts) / 3600.0
        cost = sum(((i.stopped_at if i.stopped_at is not None else end) - i.started_at) * i.roof.tp
                   * i.roof.hw.price_per_h for i in insts) / 3600.0
        recs = [self.records.get(r.rid) or Record(r.rid, r.arrival_s, r.input_len, r.output_len) for r in self.requests]
        return SimResult(recs, end, gpu_h, cost, self.cfg.slo_ttft_s, self.cfg.slo_tpot_s, self.placements,
                         list(self.scale_log), {k: v.bytes_sent for k, v in self.links.items()}, self.router_waits)

    # the fleet
    def _add_instance(self, role: str, now: float, billed_from: float):
        cfg, pool = self.cfg, (self.cfg.prefill if role == "prefill" else self.cfg.decode)
        wid = f"{role}-{self._next[role]}"
        self._next[role] += 1
        roof = self.rooflines[role]
        tiers = pool.tier_blocks(roof, cfg.block_tokens)
        if role == "prefill":
            nic = Link(roof.tp * roof.hw.nic_bps, cfg.topology.intra_zone_latency_s)
            inst = PrefillInstance(self, wid, role, roof, pool.zone, cfg.block_tokens, billed_from, tiers,
                                   batch_tokens=cfg.prefill_batch_tokens, nic=nic)
        else:
            inst = DecodeInstance(self, wid, role, roof, pool.zone, cfg.block_tokens, billed_from, tiers,
                                  max_batch=cfg.max_batch, chunk_tokens=cfg.local_chunk_tokens)
        self.inst[wid] = inst
        self.registry.add(role, _Worker(wid), zone=pool.zone)
        self.registry._ingest(self.registry.loads[wid], inst.status(), now)     # its first poll
        return inst

    def link(self, p: PrefillInstance, d: DecodeInstance) -> Link:
        if p.zone == d.zone:
            return p.nic
        key = (p.zone, d.zone)
        if key not in self.links:
            t = self.cfg.topology
            self.links[key] = Link(t.cross_zone_bps, t.cross_zone_latency_s)
        return self.links[key]

    # requests
    def _arrive(self, now: float, req: Request) -> None:
        self.records[req.rid] = Record(req.rid, req.arrival_s, req.input_len, req.output_len)
        job = Job(req, remaining=req.output_len)
        if not any(d.blocks_for(req) <= d.num_blocks for d in self.inst.values() if isinstance(d, DecodeInstance)):
            self._refuse(job)               # the router's admission: no decode pool could ever hold it
            return
        if self.pending or not self._place(job, now):     # FIFO behind the ones already waiting
            self.pending.append(job)
            self.router_waits += 1

    def _place(self, job: Job, now: float) -> bool:
        """router/lifecycle/place.py's loop: choose, expect, then start it (remote: reserve first)."""
        reg, req = self.registry, job.req
        hashes = list(req.hashes) or None
        exclude: set[str] = set()
        for k in range(self.rcfg.max_attempts):
            try:
                ch = self.policy.choose(req.input_len, reg.loads_of("prefill"), reg.loads_of("decode"), exclude,
                                        hashes=hashes, now=now)
            except Overloaded:                  # the policy shed it (DynamoKV's busy thresholds)
                return self._refuse(job)
            if ch is None:
                return False
            wait = self.rcfg.place_wait_s
            if ch.defer and (wait is None or now - req.arrival_s < wait):    # place.py's _choose: wait for room
                return False
            if k == 0 and slo_refusal(ch, reg.loads, self.telemetry.prefill_tps, req.input_len,
                                      self.rcfg.admit_ttft_s):
                return self._refuse(job)        # place.py: over the TTFT SLO, refused before anything is held
            self.placements += 1
            holder = ch.prefill or ch.decode    # place.py: the worker that computes the blocks, claimed
            claim = self.index.expect(holder, hashes, now) if hashes else None     # until a failed try
            d = self.inst[ch.decode]
            rec = self.records[req.rid]
            if d.blocks_for(req) > d.num_blocks:  # its engine refuses it (check_fits): exclude d, choose again
                self._unexpect(holder, claim)
                exclude.add(d.wid)
                continue
            if ch.kind == "local":
                job.queued = max(0, req.input_len - int((ch.estimate or {}).get("cached_tokens", 0)))
                reg.charge(d.wid, job.queued, +1)
                rec.kind, rec.decode = "local", d.wid
                d.submit_local(job, now)
                return True
            if not d.reserve(job):              # NoRoom: exclude d, choose again
                self._unexpect(holder, claim)
                exclude.add(d.wid)
                continue
            p = self.inst[ch.prefill]
            if not p.fits(req):                 # its engine refuses the prompt: exclude p, choose again
                d.release(job)
                self._unexpect(holder, claim)
                exclude.add(p.wid)
                continue
            d.reserved += 1
            # the transfer skips what d holds on device or in its host tier (a reservation loads host
            # blocks, kv_transfer/tiers/multi.py step_tokens), loaded while the prefill runs
            cached_d, load_d = d.cache_hit(req, ("host",))
            job.extra.update(p=p, d=d, cached_d=cached_d)
            if load_d:
                job.extra["loaded_d_at"] = now + load_d
            reg.charge(d.wid, 0, +1)
            reg.charge(p.wid, req.input_len, +1)
            rec.kind, rec.prefill, rec.decode = "remote", p.wid, d.wid
            p.submit(job, now)
            return True
        return False

    def _unexpect(self, holder: str, claim) -> None:
        """place.py's withdrawal of a failed try's claim (else the index counts blocks nobody computes)."""
        if claim:
            self.index.unexpect(holder, claim)

    def _refuse(self, job: Job) -> bool:
        """The router answered RESOURCE_EXHAUSTED: the request ends unserved (it counts against attainment)."""
        self.records[job.req.rid].kind = "refused"
        self.done += 1
        return True

    def prefill_done(self, job: Job, p: PrefillInstance, now: float) -> None:
        d = job.extra["d"]
        rec = self.records[job.req.rid]
        rec.cached = job.cached
        nbytes = (job.req.input_len - job.extra["cached_d"]) * p.roof.kv_bytes_per_token
        rec.kv_bytes = nbytes
        arrive = self.link(p, d).send(nbytes, job.started, now, self.model.layers)
        arrive = max(arrive, job.extra.get("loaded_d_at", arrive))      # d's host-tier blocks loaded too
        self.at(arrive, self._kv_arrived, job)

    def _kv_arrived(self, now: float, job: Job) -> None:
        p, d = job.extra["p"], job.extra["d"]
        self.registry.charge(p.wid, job.req.input_len, -1)     # the prefill call returned
        self.first_token(job, d, now)
        job.remaining -= 1                                      # the prefill worker sampled it
        d.kv_arrived(job, now)
        self._check_drains(now)

    def first_token(self, job: Job, inst, now: float) -> None:
        rec = self.records[job.req.rid]
        rec.first_s = now
        if rec.kind == "local":
            rec.cached = job.cached
            w = self.registry.loads.get(inst.wid)
            if w is not None:
                w.queued_tokens -= job.queued
        self.recent_ttft.add(now - rec.arrival_s)

    def finished(self, job: Job, d: DecodeInstance, now: float) -> None:
        rec = self.records[job.req.rid]
        rec.finish_s = now
        d.release(job)
        self.registry.charge(d.wid, 0, -1)
        if rec.tpot_s is not None:
            self.recent_tpot.add(rec.tpot_s)
        self.done += 1
        d.wake(now)
        self._check_drains(now)

    # the status poll
    def _poll(self, now: float) -> None:
        reg = self.registry
        for wid, inst in self.inst.items():
            w = reg.loads.get(wid)
            if w is not None:
                reg._ingest(w, inst.status(), now)
        self.index.expire(now)
        self._retry_pending(now)
        if self.done < len(self.requests):
            self.at(now + self.cfg.poll_s, self._poll)

    def _retry_pending(self, now: float) -> None:
        """Place the requests waiting in the router, oldest first, until one still finds no room."""
        while self.pending and self._place(self.pending[0], now):
            self.pending.pop(0)

    # the autoscaler
    def _pool_metrics(self) -> dict:
        loads = list(self.registry.loads.values())
        ms = lambda s: None if s is None else s * 1e3       # noqa: E731
        return {"prefill": pool_metrics("prefill", loads, self.starting["prefill"],
                                        p90_ttft_ms=ms(self.recent_ttft.quantile(0.9)),
                                        prompt_tokens_sent=self.registry.sent_tokens["prefill"],
                                        prefill_tps=self.telemetry.prefill_tps),
                "decode": pool_metrics("decode", loads, self.starting["decode"],
                                       p90_tpot_ms=ms(self.recent_tpot.quantile(0.9)),
                                       decode_step_s=self.telemetry.last_step_s)}

    def _autoscale_tick(self, now: float) -> None:
        for pool, dec in self.loop.run_until_complete(self.autoscaler.step()).items():
            if dec.delta:
                self.scale_log.append((now, pool, dec.delta, dec.target_replicas))
        self._settle()
        if self.done < len(self.requests):
            self.at(now + self.cfg.autoscale_interval_s, self._autoscale_tick)

    def _settle(self) -> None:
        """Let the autoscaler's action tasks run up to their next wait (the loop has no timers)."""
        for _ in range(4):
            self.loop.run_until_complete(asyncio.sleep(0))

    def _add_replica(self, role: str) -> asyncio.Future:
        """deploy/scaling.py's add_replica: returns once the replica is loaded and registered."""
        fut = self.loop.create_future()
        self.starting[role] += 1
        billed_from = self.now

        def ready(now: float) -> None:
            self.starting[role] -= 1
            inst = self._add_instance(role, now, billed_from)
            if not fut.done():
                fut.set_result(inst.wid)
            self._settle()
            self._retry_pending(now)            # a new worker: waiting requests try it now
        self.at(self.now + self.cfg.replica_start_s, ready)
        return fut

    def _drain_replica(self, role: str) -> asyncio.Future:
        """deploy/scaling.py's remove_replica: the live worker with the fewest requests (newest on
        ties) stops taking placements; returns once its requests finished and it is removed."""
        live = [w for w in self.registry.loads.values() if w.role == role and not w.draining]
        if len(live) <= 1:
            raise RuntimeError(f"not removing the last live {role} worker")
        w = min(live, key=lambda w: (w.in_flight, -int(w.worker_id.rsplit("-", 1)[1])))
        w.draining = True
        self.inst[w.worker_id].draining = True
        fut = self.loop.create_future()
        self._drains[w.worker_id] = fut
        self._check_drains(self.now)
        return fut

    def _check_drains(self, now: float) -> None:
        for wid in [w for w, _ in self._drains.items() if self.inst[w].idle and self.registry.loads[w].in_flight == 0]:
            fut = self._drains.pop(wid)
            inst = self.inst.pop(wid)
            inst.stopped_at = now
            self.retired.append(inst)
            self.registry.remove(wid)
            fut.set_result(wid)
            if not self.loop.is_running():      # called from the autoscaler's own action: it resumes itself
                self._settle()
