"""A worker's peer-pull figures (kv_transfer/pull.py), both halves. Pure Python.

Puller: pulls that landed, their blocks and payload bytes, failures (the blocks were recomputed), and a
histogram of each pull's seconds from the order to its last frame landing (the time the prompt waits).
Holder: pulls served, blocks sent by the tier they were read from (device, host, disk), bytes, refusals
or failed sends, and a histogram of each served pull's seconds (read + send). The worker reports
as_dict() in its status (pdcluster/messages.py PullFigures); the router renders them as Prometheus
metrics (router/metrics.py). Counters only rise; histograms as in kv_transfer/tiers/stats.py.
"""
from __future__ import annotations

import threading

from pdcluster.kv_transfer.tiers.stats import LATENCY_BUCKETS, Histogram

SERVE_TIERS = ("device", "host", "disk")


class PullStats:
    def __init__(self):
        self.pulls = 0                  # puller: pulls whose blocks all landed
        self.pulled_blocks = 0
        self.pulled_bytes = 0
        self.pull_failures = 0          # puller: pulls that failed (recomputed)
        self.pull_s = Histogram()       # puller: order -> landed (or failed), per pull
        self.served = 0                 # holder: pulls served completely
        self.served_blocks = dict.fromkeys(SERVE_TIERS, 0)
        self.served_bytes = 0
        self.serve_failures = 0         # holder: refused (evicted, no transport) or failed sends
        self.serve_s = Histogram()      # holder: read + send, per pull served
        self._lock = threading.Lock()

    def pulled(self, ok: bool, blocks: int, nbytes: int, seconds: float) -> None:
        with self._lock:
            if ok:
                self.pulls += 1
                self.pulled_blocks += blocks
                self.pulled_bytes += nbytes
            else:
                self.pull_failures += 1
            self.pull_s.observe(seconds)

    def served_pull(self, by_tier: dict[str, int], nbytes: int, seconds: float) -> None:
        with self._lock:
            self.served += 1
            for t, n in by_tier.items():
                self.served_blocks[t] += n
            self.served_bytes += nbytes
            self.serve_s.observe(seconds)

    def serve_failed(self) -> None:
        with self._lock:
            self.serve_failures += 1

    def as_dict(self) -> dict:
        with self._lock:
            return dict(pulls=self.pulls, pulled_blocks=self.pulled_blocks, pulled_bytes=self.pulled_bytes,
                        pull_failures=self.pull_failures, buckets=list(LATENCY_BUCKETS),
                        pull_counts=self.pull_s.cumulative(), pull_sum_s=self.pull_s.sum, served=self.served,
                        served_device_blocks=self.served_blocks["device"],
                        served_host_blocks=self.served_blocks["host"], served_disk_blocks=self.served_blocks["disk"],
                        served_bytes=self.served_bytes, serve_failures=self.serve_failures,
                        serve_counts=self.serve_s.cumulative(), serve_sum_s=self.serve_s.sum)
