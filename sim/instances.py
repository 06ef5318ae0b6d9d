"""The simulated instances: a prefill instance (batched chunked prefill, FIFO) and a decode
instance (continuous batching, chunked local prefill), plus the links KV crosses. Pure Python.

Times are seconds on the simulator's clock; `sim.at(t, fn, *args)` schedules a callback.
A decode instance advances in segments: between two changes of its batch (a join, a finish, a
prefill chunk) every step costs the same (the roofline at the segment's mid KV size), so a
segment of n steps is one event; a join cuts the running segment at its next step boundary.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdcluster.messages import WorkerStatus
from pdcluster.sim.cache import PrefixCache
from pdcluster.sim.roofline import Roofline
from pdcluster.sim.tiers import TierStack
from pdcluster.sim.trace import Request


@dataclass
class Link:
    """A FIFO pipe: bytes/s and a one-way latency (s). One per prefill instance inside its zone (its
    RDMA NICs), one shared per ordered zone pair across zones."""
    bps: float
    latency_s: float
    free_at: float = 0.0
    bytes_sent: float = 0.0

    def send(self, nbytes: float, start: float, compute_end: float, layers: int) -> float:
        """Ship nbytes streamed layer by layer from `start` (the prefill's first chunk) while the
        prefill computes until compute_end: the pipe is held for nbytes/bps from when it is free,
        and the last layer cannot leave before the compute ends. Returns the arrival time."""
        t = nbytes / self.bps
        begin = max(start, self.free_at)
        self.free_at = begin + t
        self.bytes_sent += nbytes
        return max(self.free_at, compute_end + t / max(layers, 1)) + self.latency_s


@dataclass
class Job:
    """One request as an instance sees it."""
    req: Request
    todo: int = 0                   # prompt tokens still to prefill
    ctx: int = 0                    # context tokens before the next chunk
    cached: int = 0                 # prompt tokens found in the prefix cache
    started: float | None = None
    blocks: int = 0                 # KV blocks held on the decode instance
    remaining: int = 0              # output tokens still to decode
    queued: int = 0                 # local: tokens charged to the decode worker's queue until its first token
    extra: dict = field(default_factory=dict)


class Instance:
    """What both roles share: id, role, zone, roofline, prefix cache, step counters, status."""

    def __init__(self, sim, wid: str, role: str, roof: Roofline, zone: str, block_tokens: int, started_at: float,
                 tier_blocks: dict[str, int] | None = None):
        """tier_blocks: {"host": blocks, "disk": blocks} of its lower cache tiers (None or 0s: none)."""
        self.sim, self.wid, self.role, self.roof, self.zone = sim, wid, role, roof, zone
        self.bs = block_tokens
        self.num_blocks = max(1, roof.capacity_tokens // block_tokens)
        self.cache = PrefixCache(self.num_blocks)
        self.tiers = None
        if tier_blocks and any(tier_blocks.values()):
            hw = roof.hw                     # each device of the instance loads over its own host link
            self.tiers = TierStack(tier_blocks, {"host": roof.tp * hw.host_load_bps, "disk": roof.tp * hw.disk_load_bps},
                                   block_tokens * roof.kv_bytes_per_token, self.cache._log)
            self.cache.on_evict = self.tiers.evicted
        self.f = dict(prefill_tokens=0, prefill_s=0.0, decode_steps=0, decode_seqs=0, decode_s=0.0, steps=0,
                      tokens=0, busy_s=0.0, prefix_hits=0, prefix_queries=0, host_load_bytes=0, host_load_s=0.0,
                      disk_load_bytes=0, disk_load_s=0.0)
        self.started_at, self.stopped_at = started_at, None
        self.draining = False

    @property
    def stepping(self) -> bool:
        raise NotImplementedError

    def contention(self) -> float:
        """Step-time factor from the other instances stepping now when all share one host's cores
        (SimConfig.shared_host_slowdown s: 1 + s x those instances; 0: each has its own device).
        Taken when a step (or a decode segment) starts."""
        s = self.sim.cfg.shared_host_slowdown
        if not s:
            return 1.0
        return 1.0 + s * sum(1 for i in self.sim.inst.values() if i is not self and i.stepping)

    def cache_hit(self, req: Request, tiers=("host", "disk")) -> tuple[int, float]:
        """(prompt tokens served from the cache, any tier; seconds loading the lower tiers' blocks back).
        The last token always computes; the blocks used are touched. The device prefix first, then on while a lower tier in `tiers` holds the next block (the real
        LoadBack.external_tokens); the load is counted in the {tier}_load_bytes / _s figures the
        router's Telemetry learns each tier's rate from. Without tiers: (the device prefix, 0)."""
        cap = (req.input_len - 1) // self.bs
        n = min(self.cache.lookup(req.hashes), cap)
        if self.tiers is None or n >= cap:
            return n * self.bs, 0.0
        got = self.tiers.lookup(req.hashes, n, cap, tiers)
        secs = self.tiers.load_s(got)
        for t, s in secs.items():
            self.f[f"{t}_load_bytes"] += got[t] * self.tiers.block_bytes
            self.f[f"{t}_load_s"] += s
        return (n + sum(got.values())) * self.bs, sum(secs.values())

    def status(self, **extra) -> WorkerStatus:
        return WorkerStatus.of(self.wid, self.role, "sim", 0, self.figures(), self.cache.drain(), **extra)

    def figures(self) -> dict:
        """LLMEngine.figures()'s keys (messages.EngineFigures)."""
        raise NotImplementedError

    def _count_prefill(self, tokens: int, dt: float) -> None:
        f = self.f
        f["prefill_tokens"] += tokens
        f["prefill_s"] += dt
        f["steps"] += 1
        f["tokens"] += tokens
        f["busy_s"] += dt


class PrefillInstance(Instance):
    def __init__(self, *a, batch_tokens: int = 8192, nic: Link | None = None, **kw):
        super().__init__(*a, **kw)
        self.batch_tokens, self.nic = batch_tokens, nic
        self.q: deque[Job] = deque()
        self.busy = False
        self.waiting_tokens = 0
        self.held = 0                   # blocks the prompts being computed hold (their cached prefix is shared)

    @property
    def idle(self) -> bool:
        return not self.q and not self.busy

    @property
    def stepping(self) -> bool:
        return self.busy

    def figures(self) -> dict:
        return dict(free_blocks=self.num_blocks - self.held, num_blocks=self.num_blocks,
                    waiting_tokens=self.waiting_tokens, **self.f)

    def fits(self, req: Request) -> bool:
        """The prompt fits this pool at all (the engine's check_fits: a prefill computes one token past it)."""
        return -(-req.input_len // self.bs) <= self.num_blocks

    def submit(self, job: Job, now: float) -> None:
        job.todo = job.req.input_len
        self.waiting_tokens += job.todo
        self.q.append(job)
        if not self.busy:
            self._step(now)

    def _step(self, now: float) -> None:
        budget, chunks, taken = self.batch_tokens, [], []
        load_s = 0.0                                 # tier loads of the jobs starting now, before the step
        for job in self.q:
            if job.started is None:
                blocks = -(-job.req.input_len // self.bs)
                hit = min(self.cache.lookup(job.req.hashes), (job.req.input_len - 1) // self.bs)
                if self.held + blocks - hit > self.num_blocks:
                    break                            # no blocks for it now: it and the ones behind it wait
                job.started = now
                job.cached, ld = self.cache_hit(job.req)     # touches the blocks it uses: the resize spares them
                need = blocks - min(hit, job.cached // self.bs)   # device hits are shared, tier hits load in
                self.held += need
                job.extra["prefill_blocks"] = need
                self.cache.resize(self.num_blocks - self.held)
                load_s += ld
                self.f["prefix_hits"] += job.cached
                self.f["prefix_queries"] += job.req.input_len
                self.waiting_tokens -= job.cached
                job.todo, job.ctx = job.req.input_len - job.cached, job.cached
            take = min(job.todo, budget)
            chunks.append((take, job.ctx))
            taken.append((job, take))
            budget -= take
            if budget <= 0:
                break
        if not taken:
            return                                   # the head waits for blocks a finishing prompt frees
        dt = self.roof.prefill_s(chunks) * self.contention() + load_s
        self.busy = True
        self.sim.at(now + dt, self._done, taken, dt)

    def _done(self, now: float, taken, dt: float) -> None:
        self._count_prefill(sum(t for _, t in taken), dt)
        for job, take in taken:
            job.todo -= take
            job.ctx += take
            self.waiting_tokens -= take
            if job.todo == 0:
                self.q.remove(job)
                self.held -= job.extra.pop("prefill_blocks", 0)   # its blocks stay as cached prefix
                self.cache.resize(self.num_blocks - self.held)
                self.cache.insert(job.req.hashes)
                self.sim.prefill_done(job, self, now)
        self.busy = False
        if self.q:
            self._step(now)


class DecodeInstance(Instance):
    def __init__(self, *a, max_batch: int = 256, chunk_tokens: int = 2048, **kw):
        super().__init__(*a, **kw)
        self.max_batch, self.chunk_tokens = max_batch, chunk_tokens
        self.held = 0                   # blocks reserved by requests (running, arriving, prefilling here)
        self.reserved = 0               # reservations whose KV has not arrived
        self.running: list[Job] = []
        self.joining: list[Job] = []
        self.local_q: deque[Job] = deque()
        self.seg = None                 # (t0, dt, n, version, [(prompt job, its tokens)], prompt tokens in all)
        self.version = 0
        self._stepping = False          # inside _seg_done: it starts the next segment itself

    @property
    def idle(self) -> bool:
        return not (self.running or self.joining or self.local_q or self.reserved)

    @property
    def stepping(self) -> bool:
        return self.seg is not None

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - self.held

    def figures(self) -> dict:
        return dict(free_blocks=self.free_blocks, num_blocks=self.num_blocks,
                    waiting_tokens=sum(j.todo if j.started is not None else j.req.input_len for j in self.local_q),
                    **self.f)

    def status(self, **extra) -> WorkerStatus:
        return super().status(running=len(self.running) + len(self.joining), waiting=len(self.local_q),
                              reserved=self.reserved, **extra)

    def blocks_for(self, req: Request) -> int:
        return -(-(req.input_len + req.output_len) // self.bs)

    def reserve(self, job: Job) -> bool:
        """Hold the request's KV blocks (prompt + output); cached free blocks are evicted for it.
        With SimConfig.share_prefix_blocks (an engine's prefix cache: one physical block, counted
        once), prompt blocks already cached are not held again, and its new full prompt blocks move
        from `held` into the cache once computed (`_cache_prompt`); blocks in use stay evictable
        here (the cache is an LRU without pins; a hit makes them the most recent)."""
        need = self.blocks_for(job.req)
        hit = 0
        if self.sim.cfg.share_prefix_blocks:
            hit = min(self.cache.lookup(job.req.hashes), (job.req.input_len - 1) // self.bs)
        if self.held + need - hit > self.num_blocks:
            return False
        self.held += need - hit
        job.blocks = need - hit
        job.extra["new_prompt_blocks"] = len(job.req.hashes) - hit if self.sim.cfg.share_prefix_blocks else 0
        self.cache.resize(self.num_blocks - self.held)
        return True

    def _cache_prompt(self, job: Job) -> None:
        """The prompt's full blocks are computed: they enter the prefix cache (shared: leaving `held`)."""
        moved = job.extra.pop("new_prompt_blocks", 0)
        if moved > 0:
            self.held -= moved
            job.blocks -= moved
            self.cache.resize(self.num_blocks - self.held)
        self.cache.insert(job.req.hashes)

    def release(self, job: Job) -> None:
        self.held -= job.blocks
        job.blocks = 0
        self.cache.resize(self.num_blocks - self.held)

    # arrivals
    def kv_arrived(self, job: Job, now: float) -> None:
        """A remote prefill's KV is here (its first token came with it): join the batch."""
        self.reserved -= 1
        self._cache_prompt(job)
        self._join(job, now)

    def submit_local(self, job: Job, now: float) -> None:
        self.local_q.append(job)
        self._kick(now)

    def _join(self, job: Job, now: float) -> None:
        if job.remaining <= 0:
            self.sim.finished(job, self, now)
            return
        self.joining.append(job)
        self._kick(now)

    def wake(self, now: float) -> None:
        """Blocks were released: a local prefill waiting for them may start."""
        if self.seg is None and self.local_q:
            self._kick(now)

    def _kick(self, now: float) -> None:
        """Start a segment if idle, or cut the running one at its next step boundary."""
        if self._stepping:
            return
        if self.seg is None:
            self._segment(now)
            return
        t0, dt, n, _v, chunks, _c = self.seg
        k = min(n, int((now - t0) / dt) + 1)        # the step in progress completes
        if k < n:
            self.version += 1
            self.seg = (t0, dt, k, self.version, chunks, _c)
            self.sim.at(t0 + k * dt, self._seg_done, self.version)

    def _segment(self, now: float) -> None:
        room = self.max_batch - len(self.running)
        if self.joining and room > 0:
            self.running += self.joining[:room]
            self.joining = self.joining[room:]
        chunks = []                                  # [(job, prompt tokens this step)], FIFO from the head
        # engine/scheduler.py: one token budget for the step, the running sequences' decode rows first, and a
        # waiting prompt starts only while fewer than max_num_seqs sequences run (prefilling ones included)
        budget = self.chunk_tokens - len(self.running)
        seqs = len(self.running) + sum(1 for j in self.local_q if j.started is not None)
        load_s = 0.0                                 # tier loads of the prompts starting now, before the step
        for job in list(self.local_q) if self.sim.cfg.local_batch_prompts else list(self.local_q)[:1]:
            if budget <= 0:
                break
            if job.started is None:
                if seqs >= self.max_batch or not (job.blocks or self.reserve(job)):
                    break                            # no slot or no blocks for it: the ones behind it wait too
                seqs += 1
                job.started = now
                job.cached, ld = self.cache_hit(job.req)
                load_s += ld
                self.f["prefix_hits"] += job.cached
                self.f["prefix_queries"] += job.req.input_len
                job.todo, job.ctx = job.req.input_len - job.cached, job.cached
            take = min(job.todo, budget)
            chunks.append((job, take))
            budget -= take
        if not self.running and not chunks:
            self.seg = None
            return
        b = len(self.running)
        ctx = sum(j.ctx for j in self.running)
        n = 1 if chunks else min(j.remaining for j in self.running)
        dt = self.roof.decode_s(b, ctx + b * (n - 1) / 2.0, [(t, j.ctx) for j, t in chunks] or None) * self.contention()
        dt += load_s                                 # with a chunk n == 1: the load stalls that one step
        self.version += 1
        self.seg = (now, dt, n, self.version, chunks, sum(t for _, t in chunks))
        self.sim.at(now + n * dt, self._seg_done, self.version)

    def _seg_done(self, now: float, version: int) -> None:
        if self.seg is None or version != self.seg[3]:
            return                                   # cut: a later event replaced this one
        _t0, dt, k, _v, chunks, chunk = self.seg
        self.seg, self._stepping = None, True
        b = len(self.running)
        f = self.f
        if chunks:
            self._count_prefill(chunk + b, dt)
        elif b:
            f["decode_steps"] += k
            f["decode_seqs"] += k * b
            f["decode_s"] += k * dt
            f["steps"] += k
            f["tokens"] += k * b
            f["busy_s"] += k * dt
        still = []
        for j in self.running:
            j.remaining -= k
            j.ctx += k
            if j.remaining <= 0:
                self.sim.finished(j, self, now)
            else:
                still.append(j)
        self.running = still
        for job, take in chunks:
            job.todo -= take
            job.ctx += take
            if job.todo <= 0:
                self.local_q.remove(job)
                self._cache_prompt(job)
                self.sim.first_token(job, self, now)
                job.remaining -= 1                   # the prefill step sampled the first token
                self._join(job, now)
        self._stepping = False
        self._segment(now)
