"""Per-link KV transfer bandwidth, measured from every transfer. Pure Python, thread-safe."""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass


@dataclass
class LinkStats:
    src_id: str
    dst_id: str
    total_bytes: int = 0
    total_seconds: float = 0.0  # sum of the samples' busy seconds
    count: int = 0
    ewma_bytes_per_s: float = 0.0  # 0.0 until the first sample
    last_sample_time: float = 0.0  # time.time() of the last sample, seconds since the epoch

    @property
    def mean_bytes_per_s(self) -> float:
        return self.total_bytes / self.total_seconds if self.total_seconds > 0 else 0.0


class BandwidthMeter:
    """Figures per directed link (src_id, dst_id). Each sample is one transfer's (bytes, seconds):
    the bytes it put on the wire (TransferStats.wire_bytes: frame headers and a codec's scales
    included, so a compressed transfer counts its compressed size) over its link-busy seconds, so
    bandwidths are wire bytes/s. The EWMA weighs the newest sample's bandwidth by `alpha`, the
    first sample sets it outright."""

    def __init__(self, alpha: float = 0.3):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._lock = threading.Lock()
        self._links: dict[tuple[str, str], LinkStats] = {}

    def record(self, src_id: str, dst_id: str, nbytes: int, seconds: float,
               now: float | None = None) -> None:
        """Add one sample; samples with seconds <= 0 count bytes but leave the bandwidth alone."""
        with self._lock:
            link = self._links.get((src_id, dst_id))
            if link is None:
                link = self._links[(src_id, dst_id)] = LinkStats(src_id, dst_id)
            link.total_bytes += nbytes
            link.total_seconds += max(0.0, seconds)
            link.count += 1
            link.last_sample_time = time.time() if now is None else now
            if seconds > 0:
                bw, prev = nbytes / seconds, link.ewma_bytes_per_s
                link.ewma_bytes_per_s = bw if prev == 0.0 else self.alpha * bw + (1 - self.alpha) * prev

    def bandwidth(self, src_id: str, dst_id: str) -> float | None:
        """EWMA bytes/s of the link, or None before its first timed sample."""
        with self._lock:
            link = self._links.get((src_id, dst_id))
            return link.ewma_bytes_per_s if link is not None and link.ewma_bytes_per_s > 0 else None

    def snapshot(self) -> list[dict]:
        """One plain dict per link (LinkStats fields plus mean_bytes_per_s), msgpack/JSON-ready."""
        with self._lock:
            return [asdict(link) | {"mean_bytes_per_s": link.mean_bytes_per_s}
                    for link in self._links.values()]
