"""Cost-model placement: estimate each option's time to first token and take the cheapest. Pure Python.

Options for a prompt of L tokens: every (prefill p, decode d) pair ("remote") and every decode d
alone ("local": d prefills it itself). Estimates, in seconds (rates learned online, see Telemetry):

  remote(p, d) = queue_p + compute_p + tier_load_p + exposed + join_d + remote_overhead
      queue_p    = tokens queued at p / rate_p (the router's, or its scheduler's waiting ones if more)
      compute_p  = (L - cached at p) / rate_p
      transfer   = (L - cached at d) * wire bytes per token / bandwidth(p -> d)
                   (wire bytes: what the cluster's kv_compression puts on the wire, see
                   wire_bytes_per_token and kv_codec; bandwidth: the meter's wire bytes/s)
      exposed    = max(transfer / num_layers, transfer - compute_p)   (layer-wise streaming hides
                   the rest behind the next layers' compute)
      join_d     = one decode step of d's running batch
  local(d)     = queue_d + compute_d + tier_load_d + join_d  +  penalty   (queue_d as queue_p)
      compute_d  = (L - cached at d) / local prefill rate of d
      penalty    = local_penalty * running_d * compute_d   (the decode stall its running requests
                   suffer while d prefills; a cost, not part of the TTFT)
Either kind also pays a duplicate-prefill cost (a cost, not part of the TTFT):
      duplicate  = duplicate_penalty * (most cached anywhere - cached where it prefills) / that rate
   the prefix compute this option repeats although another worker holds it. It stands for what a
   plain TTFT estimate leaves out: the repeat takes capacity from the requests that queue behind it,
   and its blocks evict another prefix on the worker that computes it (the cache pollution that
   turns one busy moment on a prefix's holder into misses later). So a prompt waits a little for
   its prefix's holder, and moves away only when the holder's queue costs more than the repeat.
   A peer pull's blocks (below) count as repeated too: the pull replaces the repeat's compute in
   the TTFT, but its copy takes room in d's pool just as a computed one would. Left out, pulls
   spread every busy prefix over both workers of the prefix-routing workload and evicted the
   others: misses on a prefix's former holder rose from 4 to 39-60 of 192 (bench/RESULTS.md,
   "Peer pull priced from measured pulls"). The pulled tokens are priced as the room they take:
   what they evict is recomputed, at d's prefill rate, unless d's pool spills to a lower tier
   (WorkerLoad.spill_tier): then it loads back from there (Telemetry.room_s_per_token), and a
   prompt leaves a busy holder for a pull sooner.
Constraints on d (either kind): free KV blocks >= blocks the prompt and its first token need beyond
d's cached prefix (engine/rules.py blocks_at_first_token);
TPOT guard: step_s(running_d + 1) <= tpot_slo_s, and for local with requests running, one prefill
chunk's step (step_s(running_d) + chunk / rate_d) <= tpot_slo_s. If no option passes the guard the
cheapest KV-feasible one is taken anyway (estimate["tpot_ok"] False) unless `tpot_strict`. If no
option is KV-feasible (every decode pool full now), the answer is the cheapest local one where it
fits (a local prefill waits in d's own queue for blocks; a remote one needs its reservation now),
marked `defer` when a remote prefill worker is usable (kv_full_defer); where no local option may be
taken (allow_local off, a prompt past local_max_tokens), the cheapest remote one, deferred: the router waits for
room (asks again after each status poll) and takes the local fallback only after
RouterConfig.place_wait_s, if set. Taken at once, that fallback collapsed a fleet whose decode
workers prefill slowly (bench/RESULTS.md, "KV-full fallback").

Configuration: router/cost_config.py; the learned rates and links: router/telemetry.py.

`choose_scan` takes the cheapest option without pricing every pair (linear in workers: feasibility
depends on d and the kind alone, and a remote cost splits into p's terms + d's terms + a link term
that depends on the pair only through d's zone and cached prefix, unless the link was measured);
`estimates` prices them all, for explanations, and `choose_exhaustive` is the reference it is
tested against (tests/unit/test_cost_model_linear.py). `choose` is choose_scan's answer from
per-worker columns kept across decisions (cost_vector.py: numpy, priced by a numba kernel where
numba imports, cost_kernel.py; refreshed only for the workers that changed), where they cover the
case (no host / disk hits, no peer pulls, some option KV-feasible), else choose_scan.
With peer pulls on (cost.peer_pull), `choose` is `choose_exhaustive`: a pull re-prices each local
option by its best holder (router/placement/pull_pricing.py), which the grouped search does not model.

Cached tokens come from the global PrefixIndex: min(match blocks, (L-1)//block_size) * block_size
(the last token always computes), times the index's confidence in that worker. The match runs
through the cache tiers (PrefixIndex.match_tiers): device blocks are free, host and disk blocks
cost their load, added to the TTFT of the worker that prefills:
      tier_load  = conf * sum over host, disk of blocks * block_size * kv_bytes_per_token / load rate
   (load rate: the worker's KV bytes/s back from that tier, learned online, Telemetry.tier_load_bps;
   not credited with overlap against the rest of the prompt's compute). When the last-token cap cuts
   the hit, it cuts disk blocks first, then host. A remote option's transfer skips d's device
   blocks and its host blocks (a reservation reuses its pool's prefix and loads the host blocks
   right after it in step, while p computes: engine/scheduler.py add_remote); d's disk blocks cross.
   The index keeps counts per tier, not positions: host blocks are taken to follow the device ones
   (disk last, as above).

Conditional disaggregation falls out of it: both sides grow linearly in L, remote starts higher
(p's queue + overhead) and local grows faster (penalty, slower local rate), so short or mostly
cached prompts prefill locally and long uncached ones remotely. The crossover length moves up when
p's queue grows or the p -> d bandwidth falls, and down as d gets busier.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Iterable

from pdcluster.engine.rules import blocks_at_first_token
from pdcluster.kv_transfer.codec_policy import CompressionPolicy, prefill_seconds   # pure Python, no torch
from pdcluster.messages import EngineFigures
from pdcluster.router.cost_config import CostConfig
from pdcluster.router.placement.base import Placement
from pdcluster.router.placement.cost_vector import SCAN, VectorChooser
from pdcluster.router.placement.load import WorkerLoad
from pdcluster.router.placement.pull_pricing import apply_pulls
from pdcluster.router.prefix_index import PrefixIndex, TierHits
from pdcluster.router.telemetry import Telemetry


# the policy
@dataclass
class Estimate:
    """One option's figures: seconds, tokens, bytes; the constraints' verdicts."""
    kind: str                               # "remote" | "local"
    prefill: str | None
    decode: str
    # the TTFT and what is minimized (cost_s = ttft_s + local_penalty_s + duplicate_penalty_s)
    cost_s: float = 0.0
    ttft_s: float = 0.0
    queue_s: float = 0.0
    compute_s: float = 0.0
    kv_codec: str = "none"                  # the codec p's CompressionPolicy is expected to pick
    transfer_s: float = 0.0
    exposed_transfer_s: float = 0.0
    transfer_bytes: float = 0.0             # on the wire, under kv_codec
    bandwidth_bps: float = 0.0              # wire bytes/s
    bandwidth_source: str = ""
    probe_needed: bool = False
    join_s: float = 0.0
    overhead_s: float = 0.0
    local_penalty_s: float = 0.0
    duplicate_penalty_s: float = 0.0       # cost of repeating prefix compute another worker holds
    tpot_ok: bool = True
    tier_load_s: float = 0.0                # loading its cached blocks from host / disk (in ttft_s)
    cached_tokens: float = 0.0              # expected at the worker that prefills
    cached_tokens_decode: float = 0.0       # expected at d (skipped by the transfer)
    resident_tokens_decode: float = 0.0     # of them in d's device pool: the blocks d need not allocate (a host or
                                            # disk hit loads into fresh device blocks)
    step_s_after: float = 0.0               # d's estimated decode step with the added load
    blocks_needed: int = 0
    kv_ok: bool = True
    # a local option's peer pull (router/placement/pull_pricing.py): blocks [first, first + n) from pull_from
    pull_from: str | None = None
    pull_first_block: int = 0
    pull_blocks: int = 0
    pull_s: float = 0.0                     # in ttft_s, instead of those blocks' compute
    pull_bandwidth_bps: float = 0.0
    pull_serve_s: float = 0.0               # the holder's seconds serving it (charged to its queue while it runs)
    pull_serve_tokens: float = 0.0          # ... as prompt tokens at the holder's prefill rate

    def as_dict(self) -> dict:
        # every field is a number, a string or None: asdict's deep copy is a plain one here. The
        # instance dict holds exactly the fields, in their order (set by __init__), unless an
        # attribute was added: then field by field
        d = self.__dict__
        if len(d) == len(_ESTIMATE_FIELDS):
            return d.copy()
        return {k: getattr(self, k) for k in _ESTIMATE_FIELDS}


_ESTIMATE_FIELDS = tuple(f.name for f in fields(Estimate))
_NO_FIGURES = EngineFigures()       # a worker's figures before its first poll (read only)
_policy = lru_cache(maxsize=None)(CompressionPolicy)     # one policy per kv_compression mode


class CostModel:
    """The `cost-model` policy. Shares the router's PrefixIndex and Telemetry (each made fresh if
    not given); config fields may also be passed as keywords."""

    def __init__(self, config: CostConfig | None = None, index: PrefixIndex | None = None,
                 telemetry: Telemetry | None = None, **overrides):
        cfg = config or (telemetry.cfg if telemetry is not None else CostConfig())
        self.cfg = replace(cfg, **overrides) if overrides else cfg
        self.index = index if index is not None else PrefixIndex()
        self.telemetry = telemetry if telemetry is not None else Telemetry(self.cfg)
        self._vector: VectorChooser | None = None     # choose's columns, made on its first call

    def warm(self) -> None:
        """Load choose's compiled pricing (cost_kernel.py) now rather than at the first placement:
        numba's import and cache load (~0.55 s CPU here), or its first compile (~3 s CPU) if none is cached."""
        if self._vector is None:
            self._vector = VectorChooser(self)
        if self._vector.kernel is not None:
            self._vector.kernel.warm()

    # pieces
    def _cached(self, n_blocks: int, prompt_len: int, conf: float) -> float:
        return cached_tokens(n_blocks, prompt_len, self.cfg.block_size, conf)

    def _transfer(self, prompt_len: int, cached_d: float, codec: str, bps: float) -> tuple[float, float]:
        """(wire bytes, seconds) of shipping the prompt's KV beyond d's cached prefix under `codec`
        over a link of `bps` wire bytes/s."""
        nbytes = (prompt_len - cached_d) * self.cfg.wire_bytes_per_token(codec)
        return nbytes, nbytes / max(bps, 1.0)

    def _exposed(self, transfer_s: float, compute_s: float) -> float:
        """The transfer seconds layer-wise streaming does not hide behind p's compute."""
        return max(transfer_s / max(self.cfg.num_layers, 1), transfer_s - compute_s)

    def _decode_verdicts(self, d: WorkerLoad, prompt_len: int, n_d: int, resident_d: float,
                         stall_s: float, reserve: bool) -> tuple[int, bool, float, bool]:
        """(blocks needed, kv_ok, step seconds after, tpot_ok) of placing the prompt on d, resident_d of its tokens
        expected in d's device pool; reserve: a remote option's (kv_fits)."""
        bs = self.cfg.block_size
        res = int(resident_d // bs)
        blocks = max(0, blocks_at_first_token(prompt_len, bs) - res)
        after = max(self.telemetry.step_s(d, n_d + 1), stall_s)
        return (blocks, kv_fits(d, blocks, res, reserve), after,
                self.cfg.tpot_slo_s is None or after <= self.cfg.tpot_slo_s)

    def _decode_checks(self, e: Estimate, d: WorkerLoad, prompt_len: int, n_d: int, stall_s: float) -> None:
        e.blocks_needed, e.kv_ok, e.step_s_after, e.tpot_ok = self._decode_verdicts(
            d, prompt_len, n_d, e.resident_tokens_decode, stall_s, e.kind == "remote")

    def kv_codec(self, prompt_len: int, p: WorkerLoad, cached_d: float, measured_bps: float | None) -> str:
        """The codec p will pick for this transfer: p's own CompressionPolicy, on the figures p
        itself uses (prefill_worker.worker._codec). "auto" compresses (AUTO_CODEC) when the reserved
        blocks' uncompressed K+V bytes / the link's own measured bandwidth (p's meter EWMA; None for
        an unmeasured link, priced from zone figures) > the whole prompt's prefill seconds at p's
        lifetime mean rate (its cumulative prefill_tokens / prefill_s, as last polled; a WorkerLoad
        prefill_tps override wins; None before p's first prefill step). Unknown figures: "none"."""
        c = self.cfg
        blocks = -(-prompt_len // c.block_size) - int(cached_d // c.block_size)
        seen = self.telemetry.perf_of(p.worker_id, p.role).counters or _NO_FIGURES
        compute_s = (prompt_len / p.prefill_tps if p.prefill_tps else
                     prefill_seconds(prompt_len, seen.prefill_tokens, seen.prefill_s))
        return _policy(c.kv_compression).choose(blocks * c.block_size * c.kv_bytes_per_token, compute_s,
                                                measured_bps)

    def tier_load_s(self, w: WorkerLoad, hits: TierHits, prompt_len: int, conf: float) -> float:
        """Seconds w takes to load the prompt's host and disk hits back into its pool (see module doc)."""
        cut = max(0, hits.total - max(0, (prompt_len - 1) // self.cfg.block_size))
        disk = max(0, hits.disk - cut)
        host = max(0, hits.host - max(0, cut - hits.disk))
        if not (host or disk):
            return 0.0
        per_block = self.cfg.block_size * self.cfg.kv_bytes_per_token
        t = self.telemetry
        return conf * per_block * (host / t.tier_load_bps(w, "host") + disk / t.tier_load_bps(w, "disk"))

    def estimate_remote(self, prompt_len: int, p: WorkerLoad, d: WorkerLoad, cached_p: float = 0.0,
                        cached_d: float = 0.0, now: float | None = None, load_p_s: float = 0.0,
                        resident_d: float | None = None) -> Estimate:
        c, t = self.cfg, self.telemetry
        rate = t.prefill_tps(p)
        n_d = max(d.running, d.in_flight)
        e = Estimate("remote", p.worker_id, d.worker_id, cached_tokens=cached_p, cached_tokens_decode=cached_d,
                     resident_tokens_decode=cached_d if resident_d is None else resident_d)
        e.queue_s = max(p.queued_tokens, p.waiting_tokens) / rate
        e.compute_s = (prompt_len - cached_p) / rate
        e.bandwidth_bps, e.bandwidth_source = t.links.bandwidth(p.worker_id, d.worker_id, p.zone, d.zone)
        e.probe_needed = t.links.probe_needed(p.worker_id, d.worker_id, now)
        e.kv_codec = self.kv_codec(prompt_len, p, cached_d, e.bandwidth_bps if e.bandwidth_source == "measured"
                                   else None)
        e.transfer_bytes, e.transfer_s = self._transfer(prompt_len, cached_d, e.kv_codec, e.bandwidth_bps)
        e.exposed_transfer_s = self._exposed(e.transfer_s, e.compute_s)
        e.join_s = t.step_s(d, n_d)
        e.overhead_s = c.remote_overhead_s
        e.tier_load_s = load_p_s
        e.ttft_s = e.queue_s + e.compute_s + e.tier_load_s + e.exposed_transfer_s + e.join_s + e.overhead_s
        e.cost_s = e.ttft_s
        self._decode_checks(e, d, prompt_len, n_d, 0.0)
        return e

    def estimate_local(self, prompt_len: int, d: WorkerLoad, cached_d: float = 0.0, load_d_s: float = 0.0,
                       resident_d: float | None = None) -> Estimate:
        """d prefills the prompt itself: cached_d tokens hit in any of its tiers, resident_d of them in its device
        pool (None: all), load_d_s to load the rest."""
        c, t = self.cfg, self.telemetry
        rate = t.prefill_tps(d)
        n_d = max(d.running, d.in_flight)
        e = Estimate("local", None, d.worker_id, cached_tokens=cached_d, cached_tokens_decode=cached_d,
                     resident_tokens_decode=cached_d if resident_d is None else resident_d)
        e.queue_s = max(d.queued_tokens, d.waiting_tokens) / rate     # its scheduler's backlog, ours or not
        e.compute_s = (prompt_len - cached_d) / rate
        e.join_s = t.step_s(d, n_d)
        e.tier_load_s = load_d_s
        e.ttft_s = e.queue_s + e.compute_s + e.tier_load_s + e.join_s
        e.local_penalty_s = c.local_penalty * n_d * e.compute_s
        e.cost_s = e.ttft_s + e.local_penalty_s
        self._decode_checks(e, d, prompt_len, n_d, self.local_stall(d, n_d, prompt_len - cached_d))
        return e

    def local_stall(self, d: WorkerLoad, n_d: int, tokens: float) -> float:
        """The step d's running requests see while it prefills `tokens` itself, a chunk per step (0
        with none running): the local TPOT guard's figure."""
        if not n_d:
            return 0.0
        return self.telemetry.step_s(d, n_d) + min(tokens, self.cfg.local_chunk_tokens) / self.telemetry.prefill_tps(d)

    def _options(self, prompt_len, prefills, decodes, exclude, hashes, now):
        """(now, usable prefills, usable decodes, {worker: expected cached tokens, any tier},
        {worker: of them in its device pool or host tier}, {worker: of them in its device pool},
        {worker: seconds to load the rest}, local allowed, {worker: its TierHits}, what peer pulls price from)."""
        c, t = self.cfg, (time.time() if now is None else now)
        ds = [d for d in decodes if d.placeable and d.worker_id not in exclude]
        ps = [p for p in prefills if p.placeable and p.worker_id not in exclude] if c.allow_remote else []
        cached: dict[str, float] = {}           # tokens a worker need not compute (any tier)
        device: dict[str, float] = {}           # of them, in its device pool or host tier (a transfer skips these)
        resident: dict[str, float] = {}         # of them, in its device pool (the blocks it need not allocate)
        load: dict[str, float] = {}             # seconds to load the rest from host / disk
        hits: dict = {}                         # worker -> TierHits (peer pulls price from these)
        if hashes:
            loads = {w.worker_id: w for w in ps + ds}
            for w, h in (hits := self.index.match_tiers(hashes, list(loads))).items():
                if h.total:
                    conf = self.index.confidence(w, t)
                    cached[w] = self._cached(h.total, prompt_len, conf)
                    device[w] = self._cached(h.device + h.host, prompt_len, conf)
                    resident[w] = self._cached(h.device, prompt_len, conf)
                    load[w] = self.tier_load_s(loads[w], h, prompt_len, conf)
        local_ok = c.allow_local and (c.local_max_tokens is None or prompt_len <= c.local_max_tokens)
        return t, ps, ds, cached, device, resident, load, local_ok, hits

    def estimates(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad],
                  exclude: Iterable[str] = frozenset(), *, hashes=None, now: float | None = None) -> list[Estimate]:
        """Every option for the prompt (feasible or not), cheapest first: |decodes| x (|prefills| + 1)
        estimates, for explanations and as the reference `choose` is tested against
        (`choose_exhaustive`); placement itself uses `choose`, linear in workers."""
        c = self.cfg
        t, ps, ds, cached, device, resident, load, local_ok, hits = self._options(
            prompt_len, prefills, decodes, exclude, hashes, now)
        out = []
        for d in ds:
            dw = d.worker_id
            if local_ok:
                out.append(self.estimate_local(prompt_len, d, cached.get(dw, 0.0), load.get(dw, 0.0),
                                               resident.get(dw, 0.0)))
            for p in ps:
                out.append(self.estimate_remote(prompt_len, p, d, cached.get(p.worker_id, 0.0), device.get(dw, 0.0),
                                                t, load.get(p.worker_id, 0.0), resident.get(dw, 0.0)))
        if c.peer_pull and hits:
            apply_pulls(self, out, prompt_len, hashes, hits,
                        [w for w in [*prefills, *decodes] if w.healthy and w.worker_id not in exclude], t)
        best_cached = max(cached.values(), default=0.0)
        if c.duplicate_penalty and best_cached:
            loads = {w.worker_id: w for w in ps + ds}
            bs = c.block_size
            for e in out:       # pulled tokens count as repeated: the copy takes room in d's pool all the same
                pulled = e.pull_blocks * bs
                repeat = best_cached - (e.cached_tokens - pulled)
                if repeat > 0:
                    w = loads[e.prefill or e.decode]
                    held = min(pulled, repeat)              # the pulled part: room, priced as what it evicts
                    e.duplicate_penalty_s = c.duplicate_penalty * (repeat - held) / self.telemetry.prefill_tps(w)
                    if held:
                        e.duplicate_penalty_s += c.duplicate_penalty * held * self.telemetry.room_s_per_token(w)
                    e.cost_s += e.duplicate_penalty_s
        out.sort(key=lambda e: (e.cost_s, e.kind != "local", e.decode, e.prefill or ""))
        return out

    def choose_exhaustive(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad],
               exclude: Iterable[str] = frozenset(), *, hashes=None, now: float | None = None) -> Placement | None:
        """The reference: `choose` by pricing every option (estimates()); quadratic in workers."""
        every = self.estimates(prompt_len, prefills, decodes, exclude, hashes=hashes, now=now)
        ests = [e for e in every if e.kv_ok]
        best = next((e for e in ests if e.tpot_ok), None)
        if best is None and not self.cfg.tpot_strict and ests:
            best = ests[0]
        defer = False
        if best is None and not ests:                   # every pool full now: queue locally where it fits
            loads = {d.worker_id: d for d in decodes}
            best = next((e for e in every if e.kind == "local" and e.blocks_needed <= loads[e.decode].num_blocks),
                        None)
            pref = next((e for e in every if e.tpot_ok), every[0] if every else None)
            defer = kv_full_defer(self.cfg.kv_full_fallback, any(e.kind == "remote" for e in every),
                                  pref is not None and pref.kind == "remote")
            if best is None:    # no local fallback (local prefills off, the prompt past local_max_tokens):
                best = next((e for e in every if e.kind == "remote"             # wait for room on the
                             and e.blocks_needed <= loads[e.decode].num_blocks), None)   # cheapest remote one
                defer = best is not None
        if best is None:
            return None
        return Placement(best.prefill, best.decode, best.kind, best.as_dict() | {"options_kv_ok": len(ests)},
                         defer=defer)

    def choose(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad],
               exclude: Iterable[str] = frozenset(), *, hashes=None, now: float | None = None) -> Placement | None:
        """The option `choose_exhaustive` takes (same Placement, same estimate): choose_scan's answer,
        from per-worker columns kept across decisions (router/placement/cost_vector.py) where those
        cover the case, else choose_scan itself."""
        if self._vector is None:
            self._vector = VectorChooser(self)
        got = self._vector.choose(prompt_len, prefills, decodes, exclude, hashes, now)
        if got is SCAN:
            return self.choose_scan(prompt_len, prefills, decodes, exclude, hashes=hashes, now=now)
        return got

    def choose_scan(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad],
                    exclude: Iterable[str] = frozenset(), *, hashes=None, now: float | None = None) -> Placement | None:
        """The option `choose_exhaustive` takes (same Placement, same estimate), found without pricing
        every (p, d) pair, in one pass over the workers.

        Why that is exact: an option's feasibility (kv_ok, tpot_ok) depends on its decode worker and
        kind alone, so the answer is the cheapest (same sort key) among each d's local option and
        each d's cheapest remote option. A remote option's cost is
            ((s(p, g) + join_d) + overhead) [+ duplicate_p],  s(p, g) = (queue_p + compute_p) + exposed(p, g)
        (the float operations estimate_remote makes, in its order), where exposed depends on d only
        through g = (d's zone, cached tokens at d) while the p -> d link is unmeasured (zone-priced;
        the codec then ignores p's rate: CompressionPolicy answers without a bandwidth). So each
        group ranks the prefill workers once, walking them per zone in two sorted orders of their
        own terms until no unseen p can beat the group's best (_Group); pairs with a measured link
        are priced one by one. Cost: O(P log P + groups x walked P + D + measured links); groups <= zones x distinct
        cached-at-d values (a handful: the prompt's prefix hit lengths)."""
        c, tel = self.cfg, self.telemetry
        if c.peer_pull:     # pulls re-price local options per holder (pull_pricing.apply_pulls): the reference
            return self.choose_exhaustive(prompt_len, prefills, decodes, exclude, hashes=hashes, now=now)
        t, ps, ds, cached, device, resident, load, local_ok, hits = self._options(
            prompt_len, prefills, decodes, exclude, hashes, now)
        if not ds:
            return None
        best_cached = max(cached.values(), default=0.0)
        dup_on = bool(c.duplicate_penalty and best_cached)
        # prefill side, once per p: (lb, id, queue+compute+load, compute, duplicate or None, p, qd)
        # lb = queue+compute+load+duplicate and qd = queue+load+duplicate bound its key s + duplicate
        # from below (up to rounding): s >= queue+compute+load + transfer/layers, s >= queue+load + transfer
        pside = []
        for p in ps:
            rate = tel.prefill_tps(p)
            cp = cached.get(p.worker_id, 0.0)
            q, comp = max(p.queued_tokens, p.waiting_tokens) / rate, (prompt_len - cp) / rate
            dup = c.duplicate_penalty * (best_cached - cp) / rate if dup_on and best_cached - cp > 0 else None
            ql = q + load.get(p.worker_id, 0.0)
            qc = q + comp + load.get(p.worker_id, 0.0)     # estimate_remote's order: queue, compute, tier load
            pside.append((qc + (dup or 0.0), p.worker_id, qc, comp, dup, p, ql + (dup or 0.0)))
        by_zone: dict[str, tuple[list, list]] = {}       # p's zone -> its rows by (lb, id) and by (qd, id)
        for r in pside:
            by_zone.setdefault(r[5].zone, ([], []))[0].append(r)
        for a, b in by_zone.values():
            a.sort(key=lambda r: (r[0], r[1]))
            b.extend(a)
            b.sort(key=lambda r: (r[6], r[1]))
        measured: dict[str, set[str]] = {}               # d -> prefill workers with a measured link to it
        pmap = {r[1]: r for r in pside}
        if ps:
            for src, dst in tel.links.links:
                if src in pmap:
                    measured.setdefault(dst, set()).add(src)
        groups: dict[tuple, _Group] = {}
        over, slo, pen, chunk = c.remote_overhead_s, c.tpot_slo_s, c.local_penalty, c.local_chunk_tokens
        need = blocks_at_first_token(prompt_len, c.block_size)
        opts = []       # (sort key, kv_ok, tpot_ok, kind, d, prefill or None)
        kv_ok_count = 0
        for d in ds:
            cd = cached.get(d.worker_id, 0.0)           # a local prefill's hit (any tier of d)
            cdev = device.get(d.worker_id, 0.0)         # what a transfer to d skips (its device pool, host tier)
            n_d = max(d.running, d.in_flight)
            # d's verdicts, as _decode_verdicts gives them (local: stall = its chunk's step): the blocks d allocates
            # are all but its device hits (a host or disk hit loads into fresh ones), for either kind
            res = int(resident.get(d.worker_id, 0.0) // c.block_size)
            blocks = max(0, need - res)
            kv, kv_r = kv_fits(d, blocks, res, False), kv_fits(d, blocks, res, True)
            step_n, step_n1 = tel.step_s(d, n_d), tel.step_s(d, n_d + 1)
            kv_ok_count += (1 if local_ok and kv else 0) + (len(ps) if kv_r else 0)
            if local_ok:        # estimate_local's cost, its float operations in its order
                rate = tel.prefill_tps(d)
                comp = (prompt_len - cd) / rate
                queue = max(d.queued_tokens, d.waiting_tokens) / rate
                cost = queue + comp + load.get(d.worker_id, 0.0) + step_n + pen * n_d * comp
                if dup_on and best_cached - cd > 0:
                    cost += c.duplicate_penalty * (best_cached - cd) / rate
                stall = step_n + min(prompt_len - cd, chunk) / rate if n_d else 0.0
                tpot = slo is None or max(step_n1, stall) <= slo
                opts.append(((cost, False, d.worker_id, ""), kv, tpot, "local", d, blocks))
            if ps and kv_r:     # a remote option on a full d is never taken (the fallback is local)
                mine = measured.get(d.worker_id, ())
                cands = []
                for _lb, _pid, qc, comp, dup, p, _qd in (pmap[w] for w in mine):
                    bps, src = tel.links.bandwidth(p.worker_id, d.worker_id, p.zone, d.zone)
                    codec = self.kv_codec(prompt_len, p, cdev, bps if src == "measured" else None)
                    cands.append((qc + self._exposed(self._transfer(prompt_len, cdev, codec, bps)[1], comp), dup, p))
                g = groups.get((d.zone, cdev))
                if g is None:
                    g = groups[(d.zone, cdev)] = _Group(self, prompt_len, by_zone, d.zone, cdev)
                cands += g.window(mine)
                best = None
                for s_p, dup, p in cands:
                    cost = s_p + step_n + over
                    if dup is not None:
                        cost += dup
                    if best is None or (cost, p.worker_id) < (best[0], best[1].worker_id):
                        best = (cost, p)
                tpot = slo is None or max(step_n1, 0.0) <= slo
                opts.append(((best[0], True, d.worker_id, best[1].worker_id), kv_r, tpot, "remote", d, best[1]))
        ests = [o for o in opts if o[1]]
        best = min((o for o in ests if o[2]), key=lambda o: o[0], default=None)
        if best is None and not c.tpot_strict and ests:
            best = min(ests, key=lambda o: o[0])
        defer = False
        if best is None and not ests:                   # every pool full now (kv_full_defer)
            if c.kv_full_fallback == "cheapest" and ps:     # needs the remote prices choose skips: the reference
                return self.choose_exhaustive(prompt_len, prefills, decodes, exclude, hashes=hashes, now=now)
            best = min((o for o in opts if o[3] == "local" and o[5] <= o[4].num_blocks),
                       key=lambda o: o[0], default=None)
            defer = kv_full_defer(c.kv_full_fallback, bool(ps), True)
            if best is None and ps:     # no local fallback: the remote one, whose prices the scan skips
                return self.choose_exhaustive(prompt_len, prefills, decodes, exclude, hashes=hashes, now=now)
        if best is None:
            return None
        d = best[4]
        if best[3] == "local":
            e = self.estimate_local(prompt_len, d, cached.get(d.worker_id, 0.0), load.get(d.worker_id, 0.0),
                                    resident.get(d.worker_id, 0.0))
            rate = tel.prefill_tps(d)
        else:
            p = best[5]
            e = self.estimate_remote(prompt_len, p, d, cached.get(p.worker_id, 0.0), device.get(d.worker_id, 0.0), t,
                                     load.get(p.worker_id, 0.0), resident.get(d.worker_id, 0.0))
            rate = tel.prefill_tps(p)
        if dup_on and best_cached - e.cached_tokens > 0:
            e.duplicate_penalty_s = c.duplicate_penalty * (best_cached - e.cached_tokens) / rate
            e.cost_s += e.duplicate_penalty_s
        return Placement(e.prefill, e.decode, e.kind, e.as_dict() | {"options_kv_ok": kv_ok_count}, defer=defer)


def cached_tokens(n_blocks: int, prompt_len: int, block_size: int, conf: float) -> float:
    """Expected tokens of a prompt a worker need not compute: its n_blocks hit blocks (whole blocks, at most
    the prompt's last token's block before it: that token is always computed) x the index's confidence."""
    return min(n_blocks, max(0, (prompt_len - 1) // block_size)) * block_size * conf


def kv_fits(d: WorkerLoad, blocks: int, resident_blocks: int, reserve: bool) -> bool:
    """d's pool holds a prompt that needs `blocks` new blocks beyond its resident_blocks device hits. True
    while d's capacity is unknown.
    reserve (a remote option: d reserves the blocks when the prefill starts, or answers NoRoom): d's free
    blocks (last reported) cover them and the hits that sit in free blocks too (a free cached block counts
    as free, yet the prompt takes it: the engine's can_allocate, need + hits from free <= free; which hits
    are free is not reported, so as many as can be).
    Not reserve (a local prefill, which waits in d's own queue until its scheduler can allocate): the new
    blocks alone. Counting the hits too would judge the prefix's holder full whenever its pool is full of
    cached blocks, and send the prompt to a worker that recomputes it (bench/RESULTS.md, 12-07)."""
    if not d.capacity_known:
        return True
    return d.free_blocks >= blocks + (min(resident_blocks, d.free_cached_blocks) if reserve else 0)


# the KV-full fallback
def kv_full_defer(mode: str, remote_usable: bool, remote_preferred: bool) -> bool:
    """Whether the local fallback taken when no option is KV-feasible is `defer`red (the router
    waits for room, router/lifecycle/place.py), by CostConfig.kv_full_fallback:
      "local"     never: take it at once (the old rule; it waits in d's own queue for blocks)
      "wait"      whenever a remote prefill worker is usable (remote prefill keeps the decode
                  workers decoding; a local prefill there stalls their batches and holds the KV
                  full longer, which sends the next prompts local too)
      "cheapest"  when the cheapest option with d's room ignored (TPOT guard first) is remote:
                  both kinds wait for the same blocks, so the wait cancels out of the comparison
    remote_preferred: that cheapest option is remote (only "cheapest" reads it)."""
    if mode == "local" or not remote_usable:
        return False
    return mode == "wait" or remote_preferred


class _Group:
    """The remote prices of one group g = (d's zone, cached tokens at d) over zone-priced links.
    window(skip): the (s, duplicate, p) that can be cheapest for a d of this group once its join
    and the overhead are added: every p whose key s + duplicate lies within float rounding of the
    lowest, one per distinct (s, duplicate) (equal rows tie to the lowest id), leaving out the
    prefill ids in `skip` (priced apart: measured links).
    Per p zone z the transfer x is one figure, and key >= max(lb + x / layers, qd + x): the zone's
    rows are walked in both orders at once (Fagin's threshold algorithm) until that bound at the
    two walk positions passes the lowest key seen, so only rows that may win are priced."""

    def __init__(self, cm: CostModel, prompt_len: int, by_zone: dict, zone: str, cd: float):
        self.by_zone, self.tr, self.layers = by_zone, {}, max(cm.cfg.num_layers, 1)
        for pz, (rows, _) in by_zone.items():   # codec and transfer seconds depend on p only via its zone here
            bps, _src = cm.telemetry.links.zone_prior(pz, zone)
            self.tr[pz] = cm._transfer(prompt_len, cd, cm.kv_codec(prompt_len, rows[0][5], cd, None), bps)[1]
        self._plain = self._walk(())

    def _walk(self, skip) -> list:
        lo, rows, seen, layers = None, [], set(), self.layers
        for pz, (by_lb, by_qd) in sorted(self.by_zone.items(), key=lambda kv: self.tr[kv[0]]):
            x = self.tr[pz]
            xl = x / layers
            for i in range(len(by_lb)):
                if lo is not None and max(by_lb[i][0] + xl, by_qd[i][6] + x) > lo + 1e-9 * (abs(lo) + 1.0):
                    break
                for r in (by_lb[i], by_qd[i]):
                    pid = r[1]
                    if pid in seen or pid in skip:
                        continue
                    seen.add(pid)
                    s_p = r[2] + max(xl, x - r[3])           # queue+compute + _exposed, inlined
                    key = s_p + (r[4] or 0.0)
                    rows.append((key, pid, s_p, r[4], r[5]))
                    if lo is None or key < lo:
                        lo = key
        if lo is None:
            return []
        tol = 1e-9 * (abs(lo) + 1.0)
        best: dict[tuple, tuple] = {}
        for r in rows:
            if r[0] <= lo + tol:
                k = (r[2], r[3])
                if k not in best or r[1] < best[k][1]:
                    best[k] = r
        return [(r[2], r[3], r[4]) for r in best.values()]

    def window(self, skip) -> list:
        if skip and any(p.worker_id in skip for _s, _d, p in self._plain):
            return self._walk(skip)
        return self._plain
