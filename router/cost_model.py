"""Cost-model placement: estimate each option's time to first token and take the cheapest. Pure Python.

Options for a prompt of L tokens: every (prefill p, decode d) pair ("remote") and every decode d
alone ("local": d prefills it itself). Estimates, in seconds (rates learned online, see Telemetry):

  remote(p, d) = queue_p + compute_p + exposed + join_d + remote_overhead
      queue_p    = tokens queued at p / rate_p
      compute_p  = (L - cached at p) / rate_p
      transfer   = (L - cached at d) * wire bytes per token / bandwidth(p -> d)
                   (wire bytes: what the cluster's kv_compression puts on the wire, see
                   wire_bytes_per_token and kv_codec; bandwidth: the meter's wire bytes/s)
      exposed    = max(transfer / num_layers, transfer - compute_p)   (layer-wise streaming hides
                   the rest behind the next layers' compute)
      join_d     = one decode step of d's running batch
  local(d)     = queue_d + compute_d + join_d  +  penalty
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
Constraints on d (either kind): free KV blocks >= blocks the prompt needs beyond d's cached prefix;
TPOT guard: step_s(running_d + 1) <= tpot_slo_s, and for local with requests running, one prefill
chunk's step (step_s(running_d) + chunk / rate_d) <= tpot_slo_s. If no option passes the guard the
cheapest KV-feasible one is taken anyway (estimate["tpot_ok"] False) unless `tpot_strict`. If no
option is KV-feasible, the cheapest local one is taken: a local prefill waits in d's own queue for
blocks, while a remote one needs its reservation now (so only remote options are refused).

Cached tokens come from the global PrefixIndex: min(match blocks, (L-1)//block_size) * block_size
(the last token always computes), times the index's confidence in that worker.

Conditional disaggregation falls out of it: both sides grow linearly in L, remote starts higher
(p's queue + overhead) and local grows faster (penalty, slower local rate), so short or mostly
cached prompts prefill locally and long uncached ones remotely. The crossover length moves up when
p's queue grows or the p -> d bandwidth falls, and down as d gets busier.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Iterable, Mapping

from kv_transfer.codec_policy import CompressionPolicy, prefill_seconds   # pure Python, no torch
from router.placement import Decision, WorkerLoad
from router.prefix_index import PrefixIndex

# Wire sizes of kv_transfer/codec.py (which needs torch; the router must not import it). Pinned to
# it by tests/unit/test_cost_model.py.
CODEC_ITEM_BYTES = {"int8": 1, "fp8": 1}                # codec.QUANT[codec].itemsize
SCALE_BYTES = 4                                         # codec.SCALE_BYTES: one float32 per scale


def wire_bytes_per_token(codec: str, kv_bytes_per_token: float, dtype_bytes: int, num_layers: int,
                         num_kv_heads: int, block_size: int) -> float:
    """Bytes one token's K+V (all layers) costs on the wire under `codec` ("none", "int8", "fp8"),
    payload + scales: kv_transfer/codec.py sends each element in CODEC_ITEM_BYTES instead of the
    cache's `dtype_bytes`, plus a float32 scale per (K/V, block, kv_head) of every layer, i.e.
    2 * num_layers * num_kv_heads * SCALE_BYTES per block of `block_size` tokens. Frame headers
    (a few hundred bytes per frame of ~2 MiB) are left out, compressed or not."""
    if codec == "none":
        return float(kv_bytes_per_token)
    if codec not in CODEC_ITEM_BYTES:
        raise ValueError(f"codec must be 'none' or one of {sorted(CODEC_ITEM_BYTES)}, got {codec!r}")
    payload = kv_bytes_per_token / dtype_bytes * CODEC_ITEM_BYTES[codec]
    return payload + 2 * num_layers * num_kv_heads * SCALE_BYTES / block_size


@dataclass(frozen=True)
class CostConfig:
    block_size: int = 16                    # tokens per KV block (the engine's)
    kv_bytes_per_token: int = 46_080        # K+V of all layers; SmolLM2-135M fp32 = 2*30*3*64*4
    num_layers: int = 30
    num_kv_heads: int = 3                   # with kv_dtype_bytes: a compressed transfer's scales and payload
    kv_dtype_bytes: int = 4                 # bytes per element of the KV cache (fp32 4, bf16/fp16 2)
    kv_compression: str = "off"             # the cluster's KV codec policy (ClusterConfig.kv_compression):
                                            #   off | int8 | fp8 | auto; transfers are priced at its wire bytes
    # priors until measurements arrive
    prior_prefill_tps: float = 2_000.0      # prefill worker, tokens/s
    prior_local_prefill_tps: float | None = None   # decode worker prefilling (None: prior_prefill_tps)
    prior_decode_base_s: float = 0.02       # decode step seconds = base + per_seq * running
    prior_decode_per_seq_s: float = 0.001
    alpha: float = 0.2                      # EWMA weight of the newest sample
    # links, bytes/s
    intra_zone_bps: float = 1.25e9          # same zone, unmeasured (10 GbE)
    cross_zone_bps: float = 1.25e8          # across zones, unmeasured (1 GbE)
    zone_pair_bps: tuple = ()               # ((zone_a, zone_b, bytes/s), ...): priors per pair (both ways)
    probe_after_s: float = 30.0             # a link with no sample for this long wants a probe
    # choice
    remote_overhead_s: float = 0.005        # reserve + prefill RPC hops of a remote placement
    local_penalty: float = 0.5              # weight of running requests' stall vs the new TTFT
    duplicate_penalty: float = 1.0          # weight of recomputing a prefix another worker holds (s per s)
    local_chunk_tokens: int = 512           # prefill tokens per step on a decode worker (TPOT guard)
    tpot_slo_s: float | None = 0.25         # decode step-time SLO; None disables the guard
    tpot_strict: bool = False               # True: no option past the guard -> None
    allow_local: bool = True
    allow_remote: bool = True
    local_max_tokens: int | None = None     # local only for prompts up to this (None: any)

    def __post_init__(self):
        CompressionPolicy(self.kv_compression)   # ValueError naming the modes

    @classmethod
    def for_model(cls, model_cfg, dtype_bytes: int, block_size: int, **kw) -> "CostConfig":
        """From engine.config.ModelConfig: the KV geometry the transfer is priced with."""
        return cls(block_size=block_size, kv_bytes_per_token=model_cfg.kv_bytes_per_token(dtype_bytes),
                   num_layers=model_cfg.num_layers, num_kv_heads=model_cfg.num_kv_heads,
                   kv_dtype_bytes=dtype_bytes, **kw)

    def wire_bytes_per_token(self, codec: str) -> float:
        return wire_bytes_per_token(codec, self.kv_bytes_per_token, self.kv_dtype_bytes, self.num_layers,
                                    self.num_kv_heads, self.block_size)


# estimators
class RateEstimator:
    """Tokens/s from (tokens, seconds) samples: a ratio of exponentially decayed sums (big samples
    weigh more than tiny ones). The prior is a pseudo-sample of `prior_s` seconds at `prior_tps`
    that decays like any other sample."""

    def __init__(self, prior_tps: float, alpha: float = 0.2, prior_s: float = 1.0):
        if prior_tps <= 0 or not 0 < alpha <= 1:
            raise ValueError("prior_tps must be > 0 and alpha in (0, 1]")
        self.alpha, self.count = alpha, 0
        self._tokens, self._seconds = prior_tps * prior_s, prior_s

    def observe(self, tokens: float, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        keep = 1.0 - self.alpha
        self._tokens = keep * self._tokens + tokens
        self._seconds = keep * self._seconds + seconds
        self.count += 1

    @property
    def rate(self) -> float:
        return self._tokens / self._seconds


class StepTimeModel:
    """Decode step seconds ~ base_s + per_seq_s * seqs, fitted online by exponentially weighted
    least squares over (seqs, seconds) samples. The prior enters as two pseudo-samples (at 1 and
    16 seqs) that decay like samples; a small ridge keeps the slope at the prior's while every
    sample has the same batch size."""

    def __init__(self, base_s: float, per_seq_s: float, alpha: float = 0.2, prior_weight: float = 2.0,
                 ridge: float = 1.0):
        self.alpha, self.ridge, self.prior, self.count = alpha, ridge, (base_s, per_seq_s), 0
        self._s = [0.0] * 5                 # weight, sum x, sum y, sum xx, sum xy
        for x in (1.0, 16.0):
            self._add(x, base_s + per_seq_s * x, prior_weight / 2)

    def _add(self, x: float, y: float, w: float) -> None:
        s = self._s
        s[0] += w; s[1] += w * x; s[2] += w * y; s[3] += w * x * x; s[4] += w * x * y

    def observe(self, seqs: float, seconds: float, weight: float = 1.0) -> None:
        if seqs <= 0 or seconds <= 0:
            return
        keep = 1.0 - self.alpha
        self._s = [keep * v for v in self._s]
        self._add(seqs, seconds, weight)
        self.count += 1

    def coeffs(self) -> tuple[float, float]:
        w, sx, sy, sxx, sxy = self._s
        mx, my = sx / w, sy / w
        var, cov = sxx / w - mx * mx, sxy / w - mx * my
        b = max(0.0, (cov + self.ridge * self.prior[1]) / (var + self.ridge))
        a = my - b * mx
        if a < 0:
            a, b = 0.0, my / mx
        return a, b

    def step_s(self, seqs: float) -> float:
        a, b = self.coeffs()
        return a + b * seqs


@dataclass
class WorkerPerf:
    prefill: RateEstimator                  # prefill tokens/s (on a decode worker: local prefill)
    decode: StepTimeModel                   # decode step seconds vs batch size
    counters: dict = field(default_factory=dict)   # last cumulative status counters seen


@dataclass
class LinkInfo:
    bytes_per_s: float
    count: int
    last_sample_time: float


class LinkTable:
    """Measured KV links (from `kv_transfer.BandwidthMeter.snapshot()` dicts: wire bytes/s, headers
    and scales included, compressed or not) and zone-pair figures.
    Zone pairs are tracked apart: an EWMA over the measured links of each directed (src zone, dst
    zone) pair prices a link that has no measurement of its own; before any, the configured prior
    (intra-zone fast, cross-zone slow, or `zone_pair_bps`)."""

    def __init__(self, cfg: CostConfig):
        self.cfg = cfg
        self.links: dict[tuple[str, str], LinkInfo] = {}
        self.zone_bps: dict[tuple[str, str], float] = {}       # learned, directed zone pair
        self._prior = {}
        for za, zb, bps in cfg.zone_pair_bps:
            self._prior[(za, zb)] = self._prior[(zb, za)] = float(bps)

    def ingest(self, snapshots: Iterable[Mapping], zones: Mapping[str, str] | None = None) -> None:
        """Take a worker's meter snapshot; links with new samples also feed their zone pair's EWMA."""
        zones = zones or {}
        for s in snapshots:
            bps = float(s.get("ewma_bytes_per_s") or 0.0)
            if bps <= 0:
                continue
            key = (s["src_id"], s["dst_id"])
            old = self.links.get(key)
            count = int(s.get("count", 0))
            self.links[key] = LinkInfo(bps, count, float(s.get("last_sample_time", 0.0)))
            if old is None or count > old.count:
                zk = (zones.get(key[0], ""), zones.get(key[1], ""))
                prev = self.zone_bps.get(zk)
                self.zone_bps[zk] = bps if prev is None else self.cfg.alpha * bps + (1 - self.cfg.alpha) * prev

    def zone_prior(self, src_zone: str, dst_zone: str) -> tuple[float, str]:
        zk = (src_zone, dst_zone)
        if zk in self.zone_bps:
            return self.zone_bps[zk], "zone-measured"
        if zk in self._prior:
            return self._prior[zk], "zone-prior"
        return (self.cfg.intra_zone_bps if src_zone == dst_zone else self.cfg.cross_zone_bps), "zone-prior"

    def bandwidth(self, src: str, dst: str, src_zone: str = "", dst_zone: str = "") -> tuple[float, str]:
        """(bytes/s, source): source is "measured", "zone-measured" or "zone-prior"."""
        link = self.links.get((src, dst))
        if link is not None:
            return link.bytes_per_s, "measured"
        return self.zone_prior(src_zone, dst_zone)

    def probe_needed(self, src: str, dst: str, now: float | None = None) -> bool:
        """True when the link was never measured or its last sample is older than probe_after_s."""
        link = self.links.get((src, dst))
        t = time.time() if now is None else now
        return link is None or t - link.last_sample_time > self.cfg.probe_after_s

    def probes_needed(self, srcs: Iterable[str], dsts: Iterable[str], now: float | None = None) -> list:
        dsts = list(dsts)
        return [(s, d) for s in srcs for d in dsts if self.probe_needed(s, d, now)]


class Telemetry:
    """What the router learns online: per-worker rates (from their step timings) and the links.

    `ingest_status(load, status)` takes one status poll. Step counters are cumulative; each poll's
    deltas are one sample. Preferred fields (split by step kind):
        prefill_tokens, prefill_s             steps that prefilled (tokens, busy seconds)
        decode_steps, decode_seqs, decode_s   decode-only steps (count, sum of batch sizes, seconds)
    Fallback (today's status): tokens, steps, busy_s, read as prefill on a prefill worker and as
    decode steps (batch = tokens / step) on a decode worker. Also read: running, waiting_tokens,
    links (a prefill worker's BandwidthMeter snapshot)."""

    def __init__(self, cfg: CostConfig | None = None):
        self.cfg = cfg or CostConfig()
        self.perf: dict[str, WorkerPerf] = {}
        self.links = LinkTable(self.cfg)

    def perf_of(self, worker_id: str, role: str = "prefill") -> WorkerPerf:
        p = self.perf.get(worker_id)
        if p is None:
            c = self.cfg
            tps = c.prior_prefill_tps if role == "prefill" else (c.prior_local_prefill_tps or c.prior_prefill_tps)
            p = self.perf[worker_id] = WorkerPerf(RateEstimator(tps, c.alpha),
                                                  StepTimeModel(c.prior_decode_base_s, c.prior_decode_per_seq_s, c.alpha))
        return p

    def remove_worker(self, worker_id: str) -> None:
        self.perf.pop(worker_id, None)

    def observe_prefill(self, worker_id: str, tokens: float, seconds: float, role: str = "prefill") -> None:
        self.perf_of(worker_id, role).prefill.observe(tokens, seconds)

    def observe_decode(self, worker_id: str, seqs: float, seconds: float) -> None:
        self.perf_of(worker_id, "decode").decode.observe(seqs, seconds)

    def ingest_status(self, load: WorkerLoad, status: Mapping, zones: Mapping[str, str] | None = None) -> None:
        load.running = int(status.get("running", load.running))
        load.waiting_tokens = int(status.get("waiting_tokens", load.waiting_tokens))
        perf = self.perf_of(load.worker_id, load.role)
        new = {k: status[k] for k in ("prefill_tokens", "prefill_s", "decode_steps", "decode_seqs",
                                      "decode_s", "tokens", "steps", "busy_s") if k in status}
        old, perf.counters = perf.counters, new
        d = {k: new[k] - old[k] for k in new if k in old}
        if any(v < 0 for v in d.values()):
            return                                  # the worker restarted: new baseline, no sample
        if "prefill_tokens" in d and "prefill_s" in d:
            perf.prefill.observe(d["prefill_tokens"], d["prefill_s"])
        if "decode_steps" in d and d["decode_steps"] > 0 and "decode_seqs" in d and "decode_s" in d:
            perf.decode.observe(d["decode_seqs"] / d["decode_steps"], d["decode_s"] / d["decode_steps"])
        if "prefill_tokens" not in new and {"tokens", "busy_s"} <= d.keys():
            if load.role == "prefill":
                perf.prefill.observe(d["tokens"], d["busy_s"])
            elif d.get("steps", 0) > 0:
                perf.decode.observe(d["tokens"] / d["steps"], d["busy_s"] / d["steps"])
        if status.get("links"):
            self.links.ingest(status["links"], zones)

    # figures for one worker (a WorkerLoad override wins over the learned figure)
    def prefill_tps(self, load: WorkerLoad) -> float:
        return load.prefill_tps or self.perf_of(load.worker_id, load.role).prefill.rate

    def step_s(self, load: WorkerLoad, seqs: float) -> float:
        if load.decode_step_s is not None:
            base, per_seq = load.decode_step_s
            return base + per_seq * seqs
        return self.perf_of(load.worker_id, "decode").decode.step_s(seqs)


# the policy
@dataclass
class Estimate:
    kind: str                               # "remote" | "local"
    prefill: str | None
    decode: str
    cost_s: float = 0.0                     # what is minimized: ttft_s + local_penalty_s + duplicate_penalty_s
    ttft_s: float = 0.0
    queue_s: float = 0.0
    compute_s: float = 0.0
    transfer_s: float = 0.0
    exposed_transfer_s: float = 0.0
    join_s: float = 0.0
    overhead_s: float = 0.0
    local_penalty_s: float = 0.0
    duplicate_penalty_s: float = 0.0       # cost of repeating prefix compute another worker holds
    cached_tokens: float = 0.0              # expected at the worker that prefills
    cached_tokens_decode: float = 0.0       # expected at d (skipped by the transfer)
    transfer_bytes: float = 0.0             # on the wire, under kv_codec
    kv_codec: str = "none"                  # the codec p's CompressionPolicy is expected to pick
    bandwidth_bps: float = 0.0              # wire bytes/s
    bandwidth_source: str = ""
    probe_needed: bool = False
    step_s_after: float = 0.0               # d's estimated decode step with the added load
    blocks_needed: int = 0
    kv_ok: bool = True
    tpot_ok: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


class CostModel:
    """The `cost-model` policy. Shares the router's PrefixIndex and Telemetry (each made fresh if
    not given); config fields may also be passed as keywords."""

    def __init__(self, config: CostConfig | None = None, index: PrefixIndex | None = None,
                 telemetry: Telemetry | None = None, **overrides):
        cfg = config or (telemetry.cfg if telemetry is not None else CostConfig())
        self.cfg = replace(cfg, **overrides) if overrides else cfg
        self.index = index if index is not None else PrefixIndex()
        self.telemetry = telemetry if telemetry is not None else Telemetry(self.cfg)

    # pieces
    def _cached(self, n_blocks: int, prompt_len: int, conf: float) -> float:
        bs = self.cfg.block_size
        return min(n_blocks, max(0, (prompt_len - 1) // bs)) * bs * conf

    def _decode_checks(self, e: Estimate, d: WorkerLoad, prompt_len: int, n_d: int, stall_s: float) -> None:
        bs = self.cfg.block_size
        e.blocks_needed = max(0, -(-prompt_len // bs) + 1 - int(e.cached_tokens_decode // bs))
        e.kv_ok = not d.capacity_known or d.free_blocks >= e.blocks_needed
        e.step_s_after = max(self.telemetry.step_s(d, n_d + 1), stall_s)
        e.tpot_ok = self.cfg.tpot_slo_s is None or e.step_s_after <= self.cfg.tpot_slo_s

    def kv_codec(self, prompt_len: int, p: WorkerLoad, cached_d: float, measured_bps: float | None) -> str:
        """The codec p will pick for this transfer: p's own CompressionPolicy, on the figures p
        itself uses (prefill_worker.worker._codec). "auto" compresses (AUTO_CODEC) when the reserved
        blocks' uncompressed K+V bytes / the link's own measured bandwidth (p's meter EWMA; None for
        an unmeasured link, priced from zone figures) > the whole prompt's prefill seconds at p's
        lifetime mean rate (its cumulative prefill_tokens / prefill_s, as last polled; a WorkerLoad
        prefill_tps override wins; None before p's first prefill step). Unknown figures: "none"."""
        c = self.cfg
        blocks = -(-prompt_len // c.block_size) - int(cached_d // c.block_size)
        counters = self.telemetry.perf_of(p.worker_id, p.role).counters
        compute_s = (prompt_len / p.prefill_tps if p.prefill_tps else
                     prefill_seconds(prompt_len, counters.get("prefill_tokens", 0), counters.get("prefill_s", 0.0)))
        return CompressionPolicy(c.kv_compression).choose(blocks * c.block_size * c.kv_bytes_per_token,
                                                          compute_s, measured_bps)

    def estimate_remote(self, prompt_len: int, p: WorkerLoad, d: WorkerLoad, cached_p: float = 0.0,
                        cached_d: float = 0.0, now: float | None = None) -> Estimate:
        c, t = self.cfg, self.telemetry
        rate = t.prefill_tps(p)
        n_d = max(d.running, d.in_flight)
        e = Estimate("remote", p.worker_id, d.worker_id, cached_tokens=cached_p, cached_tokens_decode=cached_d)
        e.queue_s = max(p.queued_tokens, p.waiting_tokens) / rate
        e.compute_s = (prompt_len - cached_p) / rate
        e.bandwidth_bps, e.bandwidth_source = t.links.bandwidth(p.worker_id, d.worker_id, p.zone, d.zone)
        e.probe_needed = t.links.probe_needed(p.worker_id, d.worker_id, now)
        e.kv_codec = self.kv_codec(prompt_len, p, cached_d, e.bandwidth_bps if e.bandwidth_source == "measured"
                                   else None)
        e.transfer_bytes = (prompt_len - cached_d) * c.wire_bytes_per_token(e.kv_codec)
        e.transfer_s = e.transfer_bytes / max(e.bandwidth_bps, 1.0)   # wire bytes / wire bytes/s
        e.exposed_transfer_s = max(e.transfer_s / max(c.num_layers, 1), e.transfer_s - e.compute_s)
        e.join_s = t.step_s(d, n_d)
        e.overhead_s = c.remote_overhead_s
        e.ttft_s = e.queue_s + e.compute_s + e.exposed_transfer_s + e.join_s + e.overhead_s
        e.cost_s = e.ttft_s
        self._decode_checks(e, d, prompt_len, n_d, 0.0)
        return e

    def estimate_local(self, prompt_len: int, d: WorkerLoad, cached_d: float = 0.0) -> Estimate:
        c, t = self.cfg, self.telemetry
        rate = t.prefill_tps(d)
        n_d = max(d.running, d.in_flight)
        e = Estimate("local", None, d.worker_id, cached_tokens=cached_d, cached_tokens_decode=cached_d)
        e.queue_s = d.queued_tokens / rate
        e.compute_s = (prompt_len - cached_d) / rate
        e.join_s = t.step_s(d, n_d)
        e.ttft_s = e.queue_s + e.compute_s + e.join_s
        e.local_penalty_s = c.local_penalty * n_d * e.compute_s
        e.cost_s = e.ttft_s + e.local_penalty_s
        stall = t.step_s(d, n_d) + min(prompt_len - cached_d, c.local_chunk_tokens) / rate if n_d else 0.0
        self._decode_checks(e, d, prompt_len, n_d, stall)
        return e

    def estimates(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad],
                  exclude: Iterable[str] = frozenset(), *, hashes=None, now: float | None = None) -> list[Estimate]:
        """Every option for the prompt (feasible or not), cheapest first."""
        c, t = self.cfg, (time.time() if now is None else now)
        ds = [d for d in decodes if d.placeable and d.worker_id not in exclude]
        ps = [p for p in prefills if p.placeable and p.worker_id not in exclude] if c.allow_remote else []
        cached: dict[str, float] = {}
        if hashes:
            hits = self.index.match(hashes, [w.worker_id for w in ps + ds])
            cached = {w: self._cached(n, prompt_len, self.index.confidence(w, t)) for w, n in hits.items() if n}
        out = []
        local_ok = c.allow_local and (c.local_max_tokens is None or prompt_len <= c.local_max_tokens)
        for d in ds:
            cd = cached.get(d.worker_id, 0.0)
            if local_ok:
                out.append(self.estimate_local(prompt_len, d, cd))
            for p in ps:
                out.append(self.estimate_remote(prompt_len, p, d, cached.get(p.worker_id, 0.0), cd, t))
        best_cached = max(cached.values(), default=0.0)
        if c.duplicate_penalty and best_cached:
            loads = {w.worker_id: w for w in ps + ds}
            for e in out:
                repeat = best_cached - e.cached_tokens
                if repeat > 0:
                    rate = self.telemetry.prefill_tps(loads[e.prefill or e.decode])
                    e.duplicate_penalty_s = c.duplicate_penalty * repeat / rate
                    e.cost_s += e.duplicate_penalty_s
        out.sort(key=lambda e: (e.cost_s, e.kind != "local", e.decode, e.prefill or ""))
        return out

    def choose(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad],
               exclude: Iterable[str] = frozenset(), *, hashes=None, now: float | None = None) -> Decision | None:
        every = self.estimates(prompt_len, prefills, decodes, exclude, hashes=hashes, now=now)
        ests = [e for e in every if e.kv_ok]
        best = next((e for e in ests if e.tpot_ok), None)
        if best is None and not self.cfg.tpot_strict and ests:
            best = ests[0]
        if best is None and not ests:                   # every pool full now: queue locally where it fits
            loads = {d.worker_id: d for d in decodes}
            best = next((e for e in every if e.kind == "local" and e.blocks_needed <= loads[e.decode].num_blocks),
                        None)
        if best is None:
            return None
        return Decision(best.prefill, best.decode, best.kind, best.as_dict() | {"options_kv_ok": len(ests)})


def config_fields() -> set[str]:
    return {f.name for f in fields(CostConfig)}


__all__ = ["CostConfig", "CostModel", "Estimate", "LinkTable", "RateEstimator", "StepTimeModel", "Telemetry",
           "WorkerPerf", "config_fields", "wire_bytes_per_token"]
