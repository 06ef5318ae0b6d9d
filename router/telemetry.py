"""What the router learns online for the cost model: per-worker prefill rates and decode step times
(from the workers' step counters), KV link bandwidths (from their meters) and each puller's peer-pull
seconds (from its pull figures). Pure Python."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from pdcluster.messages import EngineFigures, LinkFigures, PullFigures, WorkerStatus
from pdcluster.router.cost_config import CostConfig

if TYPE_CHECKING:
    from pdcluster.router.placement.load import WorkerLoad

# cumulative EngineFigures counters: any of them going back means the worker restarted
COUNTERS = ("prefill_tokens", "prefill_s", "decode_steps", "decode_seqs", "decode_s", "tokens", "steps", "busy_s",
            "host_load_bytes", "host_load_s", "disk_load_bytes", "disk_load_s")
LOWER_TIERS = ("host", "disk")
# cumulative PullFigures counters (kv_transfer/pull_stats.py): the puller's half, then the holder's
PULL_COUNTERS = ("pulls", "pulled_bytes", "pull_failures", "pull_sum_s", "served", "served_bytes", "serve_failures",
                 "serve_sum_s")
PULL_MB = 1e6                               # a pull sample's x: megabytes moved (PullTimeModel)


class RateEstimator:
    """Tokens/s from (tokens, seconds) samples: a ratio of exponentially decayed sums (big samples
    weigh more than tiny ones). `prior_tps` answers until the first sample, which replaces it
    whole: a guess must not outweigh a measurement (workers send one from their warm-up)."""

    def __init__(self, prior_tps: float, alpha: float = 0.2):
        if prior_tps <= 0 or not 0 < alpha <= 1:
            raise ValueError("prior_tps must be > 0 and alpha in (0, 1]")
        self.alpha, self.count = alpha, 0
        self._tokens, self._seconds = prior_tps, 1.0

    def observe(self, tokens: float, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        keep = 1.0 - self.alpha if self.count else 0.0
        self._tokens = keep * self._tokens + tokens
        self._seconds = keep * self._seconds + seconds
        self.count += 1

    @property
    def rate(self) -> float:
        return self._tokens / self._seconds


class FractionEstimator:
    """The share of trials that failed, over exponentially decayed counts (each observation one
    poll's counts); 0 before any trial."""

    def __init__(self, alpha: float = 0.2):
        self.alpha, self._failed, self._trials = alpha, 0.0, 0.0

    def observe(self, failed: int, trials: int) -> None:
        if trials <= 0 or not 0 <= failed <= trials:
            return
        keep = 1.0 - self.alpha
        self._failed, self._trials = keep * self._failed + failed, keep * self._trials + trials

    @property
    def fraction(self) -> float:
        return self._failed / self._trials if self._trials else 0.0


class StepTimeModel:
    """Decode step seconds ~ base_s + per_seq_s * seqs, fitted online by exponentially weighted
    least squares over (seqs, seconds) samples. The prior enters as two pseudo-samples (at 1 and
    16 seqs) that decay like samples; a small ridge keeps the slope at the prior's while every
    sample has the same batch size."""

    def __init__(self, base_s: float, per_seq_s: float, alpha: float = 0.2, prior_weight: float = 2.0,
                 ridge: float = 1.0, prior_x: tuple[float, float] = (1.0, 16.0)):
        self.alpha, self.ridge, self.prior, self.count = alpha, ridge, (base_s, per_seq_s), 0
        self._s = [0.0] * 5                 # weight, sum x, sum y, sum xx, sum xy
        for x in prior_x:
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
    tier_load: dict[str, RateEstimator]     # lower tier -> KV bytes/s it loads back into the pool
    pull: StepTimeModel                     # as a puller: seconds per peer pull vs megabytes pulled
    pull_failed: FractionEstimator          # ... and the share of its pulls that failed (recomputed)
    serve: StepTimeModel                    # as a holder: seconds per pull served (read + send) vs megabytes
    counters: EngineFigures | None = None   # the last status poll's figures (None: none yet)
    last_step_s: float | None = None        # mean decode-only step seconds since the poll before (None: none)
    pull_counters: PullFigures | None = None    # the last status poll's peer-pull figures (None: none yet)
    pull_sampled_at: float | None = None    # when its last pull time sample came (time.time())
    pull_tried_at: float | None = None      # when its last poll with a pull (landed or failed) came
    incarnation: str | None = None          # the process the counters came from (WorkerStatus.incarnation)


def pull_time_model(cfg: CostConfig) -> StepTimeModel:
    """A puller's seconds per pull ~ fixed + per-MB * megabytes, fitted from its measured pulls (order
    to last frame landed: the order's round trip, the wait for the holder's engine thread between its
    steps, the holder's read and send, the landing). Prior: pull_overhead_s + an intra-zone link's
    seconds per MB, at 1 and 32 MB, with next to no weight: the first measured pulls set the figure
    (as RateEstimator's first sample does), the prior's slope stays only while all samples have one
    size (StepTimeModel's ridge). Telemetry.pull_s prices from the link until the first sample."""
    return StepTimeModel(cfg.pull_overhead_s, PULL_MB / cfg.intra_zone_bps, cfg.alpha, prior_weight=1e-3,
                         prior_x=(1.0, 32.0))


@dataclass
class LinkInfo:
    bytes_per_s: float
    count: int
    last_sample_time: float


class LinkTable:
    """Measured KV links (a prefill worker's LinkFigures: wire bytes/s, headers and scales included,
    compressed or not) and zone-pair figures.
    Zone pairs are tracked apart: an EWMA over the measured links of each directed (src zone, dst
    zone) pair prices a link that has no measurement of its own; before any, the configured prior
    (intra-zone fast, cross-zone slow, or `zone_pair_bps`)."""

    def __init__(self, cfg: CostConfig):
        self.cfg = cfg
        self.links: dict[tuple[str, str], LinkInfo] = {}
        self.version = 0                    # bumped on every ingest (caches of link figures compare it)
        self.zone_bps: dict[tuple[str, str], float] = {}       # learned, directed zone pair
        self._prior = {}
        for za, zb, bps in cfg.zone_pair_bps:
            self._prior[(za, zb)] = self._prior[(zb, za)] = float(bps)

    def ingest(self, links: Iterable[LinkFigures], zones: Mapping[str, str] | None = None) -> None:
        """Take a worker's measured links; links with new samples also feed their zone pair's EWMA.
        zones: every registered worker's zone; a link to or from a worker not in it (removed: the
        prefill worker's meter still reports it) is skipped (None: all taken)."""
        self.version += 1
        for s in links:
            bps = float(s.ewma_bytes_per_s)
            if bps <= 0 or (zones is not None and (s.src_id not in zones or s.dst_id not in zones)):
                continue
            key = (s.src_id, s.dst_id)
            old = self.links.get(key)
            count = s.count
            self.links[key] = LinkInfo(bps, count, float(s.last_sample_time))
            if old is None or count > old.count:
                zk = (zones.get(key[0], ""), zones.get(key[1], "")) if zones else ("", "")
                prev = self.zone_bps.get(zk)
                self.zone_bps[zk] = bps if prev is None else self.cfg.alpha * bps + (1 - self.cfg.alpha) * prev

    def remove_worker(self, worker_id: str) -> None:
        """Forget the links to and from a worker that left (ids are never reused: the table would grow
        with every replica the autoscaler ever started, and scan-priced decisions with it)."""
        gone = [k for k in self.links if worker_id in k]
        for k in gone:
            del self.links[k]
        if gone:
            self.version += 1

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

    `ingest_status(load, status)` takes one WorkerStatus. Step counters are cumulative; each poll's
    deltas are one sample:
        prefill_tokens, prefill_s             steps that prefilled (tokens, busy seconds)
        decode_steps, decode_seqs, decode_s   decode-only steps (count, sum of batch sizes, seconds)
        {host,disk}_load_bytes, _load_s       KV loaded back from a lower cache tier (bytes, seconds)
        pulls.{pulls, pulled_bytes, pull_sum_s}   peer pulls landed here: one sample (mean MB, mean seconds)
                                              per poll, weighted by the pulls; a poll with failed pulls
                                              gives none (their seconds are summed with the landed ones');
                                              pulls, pull_failures: the share of pulls that fail
    Also read: running (decode), waiting_tokens, links (a prefill worker's measured links)."""

    def __init__(self, cfg: CostConfig | None = None):
        self.cfg = cfg or CostConfig()
        self.perf: dict[str, WorkerPerf] = {}
        self.links = LinkTable(self.cfg)
        # bumped when learned figures change other than through ingest_status (which touches the
        # WorkerLoad it learned for): caches of per-worker figures (placement/cost_vector.py) start over
        self.epoch = 0

    def perf_of(self, worker_id: str, role: str = "prefill") -> WorkerPerf:
        p = self.perf.get(worker_id)
        if p is None:
            c = self.cfg
            tps = c.prior_prefill_tps if role == "prefill" else (c.prior_local_prefill_tps or c.prior_prefill_tps)
            steps = StepTimeModel(c.prior_decode_base_s, c.prior_decode_per_seq_s, c.alpha)
            loads = {"host": RateEstimator(c.prior_host_load_bps, c.alpha),
                     "disk": RateEstimator(c.prior_disk_load_bps, c.alpha)}
            p = self.perf[worker_id] = WorkerPerf(RateEstimator(tps, c.alpha), steps, loads, pull_time_model(c),
                                                  FractionEstimator(c.alpha), pull_time_model(c))
        return p

    def remove_worker(self, worker_id: str) -> None:
        self.perf.pop(worker_id, None)
        self.links.remove_worker(worker_id)
        self.epoch += 1

    def changed(self) -> None:
        """Learned figures were changed directly (an estimator's observe outside ingest_status):
        caches of per-worker figures start over."""
        self.epoch += 1

    def ingest_status(self, load: WorkerLoad, status: WorkerStatus,
                      zones: Mapping[str, str] | None = None, now: float | None = None) -> None:
        """now: time.time() of the poll (None: now), the clock placement's `now` runs on."""
        new = status.engine
        if status.role == "decode":
            load.running = status.running
        load.waiting_tokens = new.waiting_tokens
        spill = next((t for t in LOWER_TIERS if any(f.tier == t and f.capacity_blocks > 0 for f in status.tiers)), "")
        if load.spill_tier != spill:
            load.spill_tier = spill
        perf = self.perf_of(load.worker_id, load.role)
        if perf.incarnation != status.incarnation:      # a new process (a restart): its counters start over
            perf.incarnation, perf.counters, perf.pull_counters = status.incarnation, None, None
        # counters start at zero with the worker: its first poll is a sample too (the warm-up's)
        old, perf.counters = perf.counters or EngineFigures(), new
        d = {k: getattr(new, k) - getattr(old, k) for k in COUNTERS}
        if any(v < 0 for v in d.values()):
            return                                  # the worker restarted: new baseline, no sample
        perf.prefill.observe(d["prefill_tokens"], d["prefill_s"])
        perf.last_step_s = d["decode_s"] / d["decode_steps"] if d["decode_steps"] > 0 else None
        if d["decode_steps"] > 0:
            perf.decode.observe(d["decode_seqs"] / d["decode_steps"], d["decode_s"] / d["decode_steps"])
        for tier in LOWER_TIERS:
            perf.tier_load[tier].observe(d[f"{tier}_load_bytes"], d[f"{tier}_load_s"])
        self._ingest_pulls(perf, status.pulls, time.time() if now is None else now)
        load.touch()                                # its learned rate / step time may have moved
        if status.links:
            self.links.ingest(status.links, zones)

    @staticmethod
    def _ingest_pulls(perf: WorkerPerf, new: PullFigures | None, now: float) -> None:
        if new is None:
            return
        old, perf.pull_counters = perf.pull_counters or PullFigures(), new
        d = {k: getattr(new, k) - getattr(old, k) for k in PULL_COUNTERS}
        if any(v < 0 for v in d.values()):
            return                                  # restarted: new baseline, no sample
        if d["served"] > 0 and not d["serve_failures"]:     # as a holder (a refusal's seconds: not a serve)
            n = d["served"]
            perf.serve.observe(d["served_bytes"] / n / PULL_MB, d["serve_sum_s"] / n, weight=float(n))
        if d["pulls"] + d["pull_failures"] <= 0:
            return
        perf.pull_tried_at = now
        perf.pull_failed.observe(d["pull_failures"], d["pulls"] + d["pull_failures"])
        if d["pull_failures"] or d["pulls"] <= 0:
            return                                  # a failure's seconds mixed in, or no pull landed
        n = d["pulls"]
        perf.pull.observe(d["pulled_bytes"] / n / PULL_MB, d["pull_sum_s"] / n, weight=float(n))
        perf.pull_sampled_at = now

    # figures for one worker (a WorkerLoad override wins over the learned figure)
    def pull_s(self, puller: WorkerLoad, nbytes: float) -> float | None:
        """Seconds a peer pull of nbytes into `puller` takes, from its measured pulls (fixed + per MB);
        None before its first measured pull (the caller prices it from the link)."""
        m = self.perf_of(puller.worker_id, puller.role).pull
        return m.step_s(nbytes / PULL_MB) if m.count else None

    def pull_weight(self, puller: WorkerLoad, now: float | None) -> float:
        """How much the puller's measured pull time still counts against the pre-measurement (link)
        price: 1 at its last sample, halving every cost.pull_price_half_life_s without a new one (None
        `now`: 1). Pulls priced too slow stop being chosen, so they give no new sample: without the
        decay a one-off slow pull would turn pulls off for good; with it the price drifts back to the
        link's until a pull is chosen and measured again (exploration)."""
        return self._fresh(self.perf_of(puller.worker_id, puller.role).pull_sampled_at, now)

    def pull_failure_fraction(self, puller: WorkerLoad, now: float | None = None) -> float:
        """The share of the puller's recent pulls that failed (the holder had evicted the blocks by the
        order, or answered late): each such prompt waited for the refusal, then computed the prefix.
        Fades like pull_weight since its last poll with a pull (a failure share stops pulls too)."""
        p = self.perf_of(puller.worker_id, puller.role)
        return p.pull_failed.fraction * self._fresh(p.pull_tried_at, now)

    def _fresh(self, at: float | None, now: float | None) -> float:
        if at is None:
            return 0.0
        if now is None:
            return 1.0
        return 0.5 ** (max(0.0, now - at) / self.cfg.pull_price_half_life_s)

    def serve_s(self, holder: WorkerLoad, nbytes: float) -> float | None:
        """Seconds the holder spends serving a pull of nbytes (its tier reads and the send), from the
        pulls it served (fixed + per MB); None before its first."""
        m = self.perf_of(holder.worker_id, holder.role).serve
        return m.step_s(nbytes / PULL_MB) if m.count else None

    def prefill_tps(self, load: WorkerLoad) -> float:
        return load.prefill_tps or self.perf_of(load.worker_id, load.role).prefill.rate

    def last_step_s(self, load: WorkerLoad) -> float | None:
        """The worker's measured mean decode step seconds over its last poll interval (a running
        request's time per output token now); None: it ran no decode step in it."""
        p = self.perf.get(load.worker_id)
        return None if p is None else p.last_step_s

    def tier_load_bps(self, load: WorkerLoad, tier: str) -> float:
        """KV bytes/s the worker loads back from a lower cache tier ("host", "disk")."""
        return self.perf_of(load.worker_id, load.role).tier_load[tier].rate

    def room_s_per_token(self, load: WorkerLoad) -> float:
        """What a token's worth of room taken in the worker's device pool costs later, in seconds: what
        it evicts is recomputed (1 / its prefill rate) or, where the pool spills to a lower tier,
        loaded back from there (KV bytes per token / that tier's load rate)."""
        if load.spill_tier:
            return self.cfg.kv_bytes_per_token / self.tier_load_bps(load, load.spill_tier)
        return 1.0 / max(self.prefill_tps(load), 1e-9)

    def step_s(self, load: WorkerLoad, seqs: float) -> float:
        if load.decode_step_s is not None:
            base, per_seq = load.decode_step_s
            return base + per_seq * seqs
        return self.perf_of(load.worker_id, "decode").decode.step_s(seqs)
