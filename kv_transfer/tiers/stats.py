"""Per-tier counters and latency histograms of a worker's KV cache tiers. Pure Python.

A worker reports them in its status (pdcluster/messages.py TierFigures); the router renders them as
Prometheus metrics (router/metrics.py). Counters only rise; histograms are cumulative bucket counts
over LATENCY_BUCKETS (seconds, upper bounds; the last bucket is +Inf).
"""
from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    """Counts per bucket (not cumulative) plus the sum; thread-safe through its TierStats' lock."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)     # last: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[int]:
        out, acc = [], 0
        for c in self.counts:
            acc += c
            out.append(acc)
        return out


class TierStats:
    """One tier's figures. hits/loads count blocks loaded back into the device pool from this tier."""

    def __init__(self, tier: str, capacity_blocks: int, block_bytes: int):
        self.tier = tier
        self.capacity_blocks = capacity_blocks
        self.block_bytes = block_bytes       # bytes one block takes in this tier (compressed size)
        self.blocks = 0                      # held now
        self.hits = 0                        # blocks loaded back from here
        self.load_failures = 0               # loads that failed (missing, corrupt): the tokens are recomputed
        self.loaded_bytes = 0
        self.stored = 0                      # blocks written here
        self.stored_bytes = 0
        self.store_failures = 0              # blocks a write failed to store here (a full or failing disk)
        self.dropped = 0                     # blocks never queued for any tier: the writer's queue was full
        self.evicted = 0                     # blocks evicted by the LRU
        self.corrupt = 0                     # blocks found corrupt (checksum, header) and dropped
        self.served = 0                      # blocks read out for peers' pulls (kv_transfer/pull.py)
        self.served_bytes = 0
        self.load_s = Histogram()            # per load job (all its blocks from this tier)
        self.store_s = Histogram()           # per block written
        self.serve_s = Histogram()           # per pull served (all its blocks read from this tier)
        self._lock = threading.Lock()

    def add(self, **counts) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def observe(self, hist: str, seconds: float) -> None:
        with self._lock:
            getattr(self, hist).observe(seconds)

    def as_dict(self) -> dict:
        with self._lock:
            return dict(tier=self.tier, capacity_blocks=self.capacity_blocks, block_bytes=self.block_bytes,
                        blocks=self.blocks, hits=self.hits, load_failures=self.load_failures,
                        loaded_bytes=self.loaded_bytes, stored=self.stored, stored_bytes=self.stored_bytes,
                        store_failures=self.store_failures, dropped=self.dropped,
                        evicted=self.evicted, corrupt=self.corrupt, served=self.served,
                        served_bytes=self.served_bytes, buckets=list(LATENCY_BUCKETS),
                        load_counts=self.load_s.cumulative(), load_sum_s=self.load_s.sum,
                        store_counts=self.store_s.cumulative(), store_sum_s=self.store_s.sum,
                        serve_counts=self.serve_s.cumulative(), serve_sum_s=self.serve_s.sum)


class SnapshotStats:
    """The engine thread's share: copying evicted device blocks out before they are overwritten."""

    def __init__(self):
        self.calls = 0              # eviction hooks that copied anything
        self.blocks = 0             # blocks copied
        self.seconds = 0.0          # engine-thread time spent copying (the write-behind's only on-step cost)
        self.skipped = 0            # evicted blocks already in a lower tier (no copy)
        self.dropped = 0            # evicted blocks not kept: the writer's queue was full

    def as_dict(self) -> dict:
        return dict(calls=self.calls, blocks=self.blocks, seconds=self.seconds, skipped=self.skipped,
                    dropped=self.dropped)
