"""The router's own settings: admission, placement, retries, and the bounds on every worker call."""
from __future__ import annotations

from dataclasses import dataclass

from pdcluster.router.placement import DEFAULT_POLICY


@dataclass(frozen=True)
class RouterConfig:
    max_in_flight: int = 512                # admission bound; beyond it RESOURCE_EXHAUSTED at once
    max_queue_wait_s: float | None = 30.0   # expected wait before a prefill starts; beyond it the same
    max_attempts: int = 3                   # placements tried per attempt before UNAVAILABLE
    max_migrations: int = 2                 # lost decode workers survived per request
    local_prefill_max_tokens: int = 0       # prompts this short prefill on the decode worker
    remote_prefill: bool = True
    status_interval_s: float = 0.5
    policy: str = DEFAULT_POLICY            # round-robin | least-loaded | cache-aware | cost-model
    block_size: int = 16                    # the workers' KV block size (prefix hashes are per block)


@dataclass(frozen=True)
class Timeouts:
    """Bounds on every call to a worker, seconds. A call past its bound means a lost worker."""
    prefill_s: float = 120.0        # one remote prefill incl. its KV transfer (long prompts on CPU)
    stream_gap_s: float = 60.0      # reserve, and the longest silence between two token items
    health_s: float = 5.0           # a status poll; a worker that misses it is marked unhealthy
    control_s: float = 10.0         # abort, prefix-index resync
