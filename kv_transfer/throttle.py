"""Token bucket used to emulate a slow link in the sender. Pure Python; not thread-safe (one loop)."""
from __future__ import annotations

import time
from typing import Callable


class TokenBucket:
    """Long-run throughput <= rate bytes/s, bursts <= burst bytes.

    `reserve(n)` takes n tokens at once and returns how long to sleep before sending them. The
    balance may go negative (debt), so a message larger than the burst is still paced exactly:
    sending n bytes after a sleep of reserve(n) never exceeds rate * elapsed + burst."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 0:
            raise ValueError(f"need rate > 0 and burst >= 0, got {rate}, {burst}")
        self.rate, self.burst = float(rate), float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._t = clock()

    def reserve(self, n: int) -> float:
        """Seconds to wait before sending n bytes."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
        self._t = now
        self._tokens -= n
        return max(0.0, -self._tokens / self.rate)
