"""The router's Prometheus metrics: one registry per Router, served over HTTP by `serve_http`.

Request-side figures are recorded by the Router's lifecycle hooks (`admitted`, `first_token`,
`placed`, `finished`). Worker-side figures arrive through the router's status polling
(`Registry.refresh` -> `worker_status`) and are rendered at scrape time by a collector, labelled
by worker id (and by link for KV transfer), so workers open no ports of their own. Counters taken
from a worker's status are that worker's running totals (they restart at 0 if the worker does).

Exported (units in the names; counters get `_total` in the exposition):
  pdcluster_ttft_seconds / _tpot_seconds / _e2e_seconds   histograms (TPOT = (e2e - ttft) / (n - 1))
  pdcluster_requests_total{status}                       finished requests: stop|length|abort|...
  pdcluster_queue_depth                                  admitted, no token streamed yet
  pdcluster_running_requests                             streaming tokens
  pdcluster_placement_decisions_total{kind}              remote | local
  pdcluster_pool_replicas{pool}                          workers registered per pool
  pdcluster_worker_up{worker,pool}                       1 when the last status poll answered
  pdcluster_kv_blocks_used{worker} / _kv_blocks_free{worker}
  pdcluster_prefix_cache_hits_tokens_total{worker} / _prefix_cache_queries_tokens_total{worker}
  pdcluster_kv_transfer_bytes_total{src,dst} / _kv_transfer_seconds_total{src,dst}
  pdcluster_worker_busy_seconds_total{worker} / _worker_steps_total{worker}
  pdcluster_kv_tier_blocks{worker,tier} / _kv_tier_capacity_blocks{worker,tier}   host / disk cache tiers
  pdcluster_kv_tier_hits_blocks_total{worker,tier}          blocks loaded back into the device pool
  pdcluster_kv_tier_loaded_bytes_total / _stored_bytes_total{worker,tier}
  pdcluster_kv_tier_load_failures_total / _corrupt_blocks_total / _evicted_blocks_total{worker,tier}
  pdcluster_kv_tier_store_failures_blocks_total{worker,tier}   blocks a write failed to store (disk full)
  pdcluster_kv_tier_dropped_blocks_total{worker,tier}        blocks never queued: the writer lagged
  pdcluster_kv_tier_load_seconds / _store_seconds{worker,tier}   histograms (per load job / per block)
  pdcluster_kv_tier_served_blocks_total / _served_bytes_total{worker,tier}   read out for peers' pulls
  pdcluster_kv_tier_serve_seconds{worker,tier}               histogram (per pull served from the tier)
  pdcluster_kv_pulls_total / _pull_failures_total{worker}    peer pulls landed / failed (recomputed) here
  pdcluster_kv_pulled_blocks_total / _pulled_bytes_total{worker}
  pdcluster_kv_pull_seconds{worker}                          histogram: order to last frame, per pull
  pdcluster_kv_pulls_served_total / _pull_serve_failures_total{worker}   pulls served / refused as holder
  pdcluster_kv_pull_served_blocks_total{worker,tier}         blocks sent as holder, by the tier read
  pdcluster_kv_pull_serve_seconds{worker}                    histogram: read + send, per pull served
  pdcluster_autoscaler_decisions_total{pool,direction,cause}  every tick's decision: up|down|hold and why
  pdcluster_autoscaler_actions_total{pool,action,result}     replicas added|removed: ok|failed
  pdcluster_autoscaler_load{pool}                            the pool's signal / its target (NaN: no data)
  pdcluster_autoscaler_target_replicas{pool}                 replicas the last decision aims at

The autoscaler's latency signals (p90 TTFT/TPOT) come from `recent_ttft` / `recent_tpot`, the
samples of the last `recent_window_s` seconds (the histograms above are cumulative).
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from pdcluster.messages import WorkerStatus
from pdcluster.ports import bind_tcp

# seconds
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
PLACEMENT_KINDS = ("remote", "local")


class RecentWindow:
    """Samples of the last `window_s` seconds (monotonic clock) and their quantiles. Pure Python."""

    def __init__(self, window_s: float = 30.0, clock=time.monotonic):
        self.window_s, self.clock = window_s, clock
        self._samples: deque[tuple[float, float]] = deque()     # (time, value), oldest first

    def add(self, value: float) -> None:
        self._samples.append((self.clock(), value))

    def quantile(self, q: float) -> float | None:
        """The q-quantile (nearest rank) of the window's samples; None when there are none."""
        cutoff = self.clock() - self.window_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()
        if not self._samples:
            return None
        vals = sorted(v for _, v in self._samples)
        return vals[min(len(vals) - 1, max(0, math.ceil(q * len(vals)) - 1))]


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, recent_window_s: float = 30.0):
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.ttft = Histogram("pdcluster_ttft_seconds", "Time to first token, from admission at the router",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pdcluster_tpot_seconds", "Mean time per output token after the first, per request",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("pdcluster_e2e_seconds", "End-to-end latency of finished requests",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("pdcluster_requests", "Requests ended, by status", ["status"], registry=r)
        self.queue_depth = Gauge("pdcluster_queue_depth", "Requests admitted that have not streamed a token yet",
                                 registry=r)
        self.running = Gauge("pdcluster_running_requests", "Requests streaming tokens", registry=r)
        self.placements = Counter("pdcluster_placement_decisions", "Placements made, by kind", ["kind"], registry=r)
        for kind in PLACEMENT_KINDS:
            self.placements.labels(kind)
        self.restarts = Counter("pdcluster_worker_restarts", "Worker restarts seen (re-registrations)", ["worker"],
                                registry=r)
        self.dead = Counter("pdcluster_workers_dead", "Workers removed as dead for good (no Ray restart left)",
                            ["pool"], registry=r)
        self.scale_decisions = Counter("pdcluster_autoscaler_decisions", "Autoscaler decisions per tick, by cause",
                                       ["pool", "direction", "cause"], registry=r)
        self.scale_actions = Counter("pdcluster_autoscaler_actions", "Replicas the autoscaler added or removed",
                                     ["pool", "action", "result"], registry=r)
        self.scale_load = Gauge("pdcluster_autoscaler_load", "Pool signal / its target at the last tick (NaN: no data)",
                                ["pool"], registry=r)
        self.scale_target = Gauge("pdcluster_autoscaler_target_replicas", "Replicas the last decision aims at",
                                  ["pool"], registry=r)
        self.recent_ttft = RecentWindow(recent_window_s)     # seconds
        self.recent_tpot = RecentWindow(recent_window_s)     # seconds per output token
        self._lock = threading.Lock()
        self._pools: dict[str, str] = {}              # worker id -> pool ("prefill" | "decode")
        self._status: dict[str, WorkerStatus | None] = {}     # worker id -> last status (None = poll failed)
        r.register(_WorkerCollector(self))
        self._http = None

    # request hooks (the Router's event loop)
    def admitted(self) -> None:
        self.queue_depth.inc()

    def first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)
        self.recent_ttft.add(ttft_s)
        self.queue_depth.dec()
        self.running.inc()

    def placed(self, kind: str) -> None:
        self.placements.labels(kind).inc()

    def finished(self, status: str, ttft_s: float | None, e2e_s: float, completion_tokens: int) -> None:
        """Every admitted request ends here once. Latencies count only for normal finishes."""
        (self.queue_depth if ttft_s is None else self.running).dec()
        self.requests.labels(status).inc()
        if status in ("stop", "length"):
            self.e2e.observe(e2e_s)
            if ttft_s is not None and completion_tokens > 1:
                self.tpot.observe((e2e_s - ttft_s) / (completion_tokens - 1))
                self.recent_tpot.add((e2e_s - ttft_s) / (completion_tokens - 1))

    def rejected(self, status: str) -> None:
        """A request refused before admission (e.g. "overloaded")."""
        self.requests.labels(status).inc()

    # worker hooks (status polling)
    def add_worker(self, worker_id: str, pool: str) -> None:
        with self._lock:
            self._pools[worker_id] = pool
            self._status.setdefault(worker_id, None)

    def remove_worker(self, worker_id: str) -> None:
        with self._lock:
            self._pools.pop(worker_id, None)
            self._status.pop(worker_id, None)
        try:
            self.restarts.remove(worker_id)
        except KeyError:
            pass

    # autoscaler hooks (PoolAutoscaler's observer)
    def autoscale_decision(self, dec) -> None:
        """dec: router.autoscaler.ScaleDecision."""
        self.scale_decisions.labels(dec.pool, dec.direction, dec.cause or "none").inc()
        self.scale_load.labels(dec.pool).set(math.nan if dec.load is None else dec.load)
        self.scale_target.labels(dec.pool).set(dec.target_replicas)

    def autoscale_action(self, pool: str, action: str, ok: bool) -> None:
        self.scale_actions.labels(pool, action, "ok" if ok else "failed").inc()

    def worker_restarted(self, worker_id: str) -> None:
        self.restarts.labels(worker_id).inc()

    def worker_status(self, worker_id: str, status: WorkerStatus | None) -> None:
        with self._lock:
            self._status[worker_id] = status

    # exposition
    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve_http(self, host: str = "127.0.0.1", port: int = 9090) -> int:
        """Serve /metrics on host:port (0 = an ephemeral port) from a daemon thread; returns the port."""
        if self._http is None:
            self._http = bind_tcp(lambda: start_http_server(port, addr=host, registry=self.registry), host, port,
                                  "the router's Prometheus metrics", "--metrics-port (0 turns metrics off)")
        return self._http[0].server_port

    def stop_http(self) -> None:
        if self._http is not None:
            httpd, thread = self._http
            httpd.shutdown()
            httpd.server_close()
            thread.join(5.0)
            self._http = None


class _WorkerCollector:
    """Renders the last polled worker figures at scrape time."""

    def __init__(self, m: RouterMetrics):
        self.m = m

    def collect(self):
        with self.m._lock:
            pools, status = dict(self.m._pools), dict(self.m._status)
        replicas = GaugeMetricFamily("pdcluster_pool_replicas", "Workers registered per pool", labels=["pool"])
        for pool in ("prefill", "decode"):
            replicas.add_metric([pool], sum(1 for p in pools.values() if p == pool))
        up = GaugeMetricFamily("pdcluster_worker_up", "1 when the worker's last status poll answered",
                               labels=["worker", "pool"])
        used = GaugeMetricFamily("pdcluster_kv_blocks_used", "KV cache blocks in use", labels=["worker"])
        free = GaugeMetricFamily("pdcluster_kv_blocks_free", "KV cache blocks free", labels=["worker"])
        hits = CounterMetricFamily("pdcluster_prefix_cache_hits_tokens",
                                   "Prompt tokens found in the worker's prefix cache", labels=["worker"])
        queries = CounterMetricFamily("pdcluster_prefix_cache_queries_tokens",
                                      "Prompt tokens looked up in the worker's prefix cache", labels=["worker"])
        busy = CounterMetricFamily("pdcluster_worker_busy_seconds", "Seconds the worker spent in forward steps",
                                   labels=["worker"])
        steps = CounterMetricFamily("pdcluster_worker_steps", "Forward steps run by the worker", labels=["worker"])
        kv_bytes = CounterMetricFamily("pdcluster_kv_transfer_bytes",
                                       "KV bytes on the wire prefill -> decode (compressed size), per link",
                                       labels=["src", "dst"])
        kv_secs = CounterMetricFamily("pdcluster_kv_transfer_seconds",
                                      "Seconds spent sending KV, per link (sum over transfers)", labels=["src", "dst"])
        for worker_id, pool in sorted(pools.items()):
            s = status.get(worker_id)
            up.add_metric([worker_id, pool], 0.0 if s is None else 1.0)
            if s is None:
                continue
            e = s.engine
            used.add_metric([worker_id], e.num_blocks - e.free_blocks)
            free.add_metric([worker_id], e.free_blocks)
            hits.add_metric([worker_id], e.prefix_hits)
            queries.add_metric([worker_id], e.prefix_queries)
            busy.add_metric([worker_id], e.busy_s)
            steps.add_metric([worker_id], e.steps)
            for link in s.links:
                kv_bytes.add_metric([link.src_id, link.dst_id], link.total_bytes)
                kv_secs.add_metric([link.src_id, link.dst_id], link.total_seconds)
        yield from (replicas, up, used, free, hits, queries, busy, steps, kv_bytes, kv_secs)
        yield from _tier_metrics(pools, status)
        yield from _pull_metrics(pools, status)


def _tier_metrics(pools: dict, status: dict):
    """Each worker's KV cache tiers (WorkerStatus.tiers), labelled by worker and tier."""
    lab = ["worker", "tier"]
    gauges = {"blocks": GaugeMetricFamily("pdcluster_kv_tier_blocks", "KV blocks held in the tier", labels=lab),
              "capacity_blocks": GaugeMetricFamily("pdcluster_kv_tier_capacity_blocks", "KV blocks the tier can hold",
                                                   labels=lab)}
    counters = {
        "hits": CounterMetricFamily("pdcluster_kv_tier_hits_blocks", "KV blocks loaded back from the tier", labels=lab),
        "loaded_bytes": CounterMetricFamily("pdcluster_kv_tier_loaded_bytes", "Bytes loaded back from the tier",
                                            labels=lab),
        "stored_bytes": CounterMetricFamily("pdcluster_kv_tier_stored_bytes", "Bytes written into the tier",
                                            labels=lab),
        "load_failures": CounterMetricFamily("pdcluster_kv_tier_load_failures",
                                             "Loads from the tier that failed (recomputed)", labels=lab),
        "corrupt": CounterMetricFamily("pdcluster_kv_tier_corrupt_blocks", "Corrupt blocks found and dropped",
                                       labels=lab),
        "store_failures": CounterMetricFamily("pdcluster_kv_tier_store_failures_blocks",
                                              "Blocks a write failed to store in the tier (full or failing disk)",
                                              labels=lab),
        "dropped": CounterMetricFamily("pdcluster_kv_tier_dropped_blocks",
                                       "Blocks never queued for the tiers: the writer's queue was full", labels=lab),
        "evicted": CounterMetricFamily("pdcluster_kv_tier_evicted_blocks", "Blocks the tier's LRU evicted",
                                       labels=lab),
        "served": CounterMetricFamily("pdcluster_kv_tier_served_blocks", "Blocks read from the tier for peers' pulls",
                                      labels=lab),
        "served_bytes": CounterMetricFamily("pdcluster_kv_tier_served_bytes",
                                            "Bytes read from the tier for peers' pulls", labels=lab)}
    hists = {"load": HistogramMetricFamily("pdcluster_kv_tier_load_seconds",
                                           "Seconds to load a request's blocks from the tier into the device pool",
                                           labels=lab),
             "store": HistogramMetricFamily("pdcluster_kv_tier_store_seconds", "Seconds to store one block in the tier",
                                            labels=lab),
             "serve": HistogramMetricFamily("pdcluster_kv_tier_serve_seconds",
                                            "Seconds to read a pull's blocks from the tier (served to a peer)",
                                            labels=lab)}
    for worker_id in sorted(pools):
        s = status.get(worker_id)
        for t in (s.tiers if s is not None else ()):
            key = [worker_id, t.tier]
            for name, fam in (gauges | counters).items():
                fam.add_metric(key, getattr(t, name))
            for name, fam in hists.items():
                counts = getattr(t, f"{name}_counts")
                if counts:
                    fam.add_metric(key, _buckets(t.buckets, counts), getattr(t, f"{name}_sum_s"))
    yield from (*gauges.values(), *counters.values(), *hists.values())


def _buckets(bounds: list[float], counts: list[int]) -> list[tuple[str, int]]:
    return list(zip([str(b) for b in bounds] + ["+Inf"], counts))


def _pull_metrics(pools: dict, status: dict):
    """Each worker's peer pulls (WorkerStatus.pulls): as puller, and as holder by the tier read."""
    w = ["worker"]
    counters = {
        "pulls": CounterMetricFamily("pdcluster_kv_pulls", "Peer pulls whose blocks all landed here", labels=w),
        "pull_failures": CounterMetricFamily("pdcluster_kv_pull_failures",
                                             "Peer pulls that failed here (the blocks were recomputed)", labels=w),
        "pulled_blocks": CounterMetricFamily("pdcluster_kv_pulled_blocks", "KV blocks landed by peer pulls", labels=w),
        "pulled_bytes": CounterMetricFamily("pdcluster_kv_pulled_bytes", "KV payload bytes landed by peer pulls",
                                            labels=w),
        "served": CounterMetricFamily("pdcluster_kv_pulls_served", "Peer pulls this worker served as holder", labels=w),
        "serve_failures": CounterMetricFamily("pdcluster_kv_pull_serve_failures",
                                              "Peer pulls this worker refused or failed to send", labels=w),
        "served_bytes": CounterMetricFamily("pdcluster_kv_pull_served_bytes", "KV payload bytes sent to pullers",
                                            labels=w)}
    by_tier = CounterMetricFamily("pdcluster_kv_pull_served_blocks", "KV blocks sent to pullers, by the tier read",
                                  labels=["worker", "tier"])
    hists = {"pull": HistogramMetricFamily("pdcluster_kv_pull_seconds",
                                           "Seconds from a pull's order to its last frame landing", labels=w),
             "serve": HistogramMetricFamily("pdcluster_kv_pull_serve_seconds",
                                            "Seconds to read and send one pull as holder", labels=w)}
    for worker_id in sorted(pools):
        s = status.get(worker_id)
        p = s.pulls if s is not None else None
        if p is None:
            continue
        for name, fam in counters.items():
            fam.add_metric([worker_id], getattr(p, name))
        for tier in ("device", "host", "disk"):
            by_tier.add_metric([worker_id, tier], getattr(p, f"served_{tier}_blocks"))
        for name, fam in hists.items():
            counts = getattr(p, f"{name}_counts")
            if counts:
                fam.add_metric([worker_id], _buckets(p.buckets, counts), getattr(p, f"{name}_sum_s"))
    yield from (*counters.values(), by_tier, *hists.values())
