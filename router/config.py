"""The router's own settings: admission, placement, retries, and the bounds on every worker call.

Nodes of the cluster's config tree (deploy/config.py); a field with `metadata["help"]` is a
`pdcluster serve` flag (deploy/flags.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pdcluster.engine.config import CacheConfig
from pdcluster.router.placement import DEFAULT_POLICY, POLICY_NAMES


@dataclass(frozen=True)
class RouterConfig:
    max_in_flight: int = 512                # admission bound; beyond it RESOURCE_EXHAUSTED at once
    max_queue_wait_s: float | None = field(  # expected wait before a prefill starts; beyond it the same
        default=30.0, metadata={"cli": "--max-queue-wait", "zero_is_none": True, "above": 0, "help": (
            "admission: a request whose prefill could not start within this many seconds (the queued prompt "
            "tokens / the measured prefill rate), or whose first token could not come within its own gRPC "
            "deadline, gets RESOURCE_EXHAUSTED at once; 0 = only the deadline")})
    admit_ttft_s: float | None = field(      # router/admission.py slo_refusal, checked in router/lifecycle/place.py
        default=None, metadata={"cli": "--admit-ttft", "zero_is_none": True, "above": 0, "help": (
            "admission by TTFT SLO: a new request whose expected time to first token on the placement the policy "
            "chose (the cost model's estimate; other policies: that worker's queued prompt tokens + the prompt "
            "over its measured prefill rate) is over this many seconds gets RESOURCE_EXHAUSTED at once, before "
            "anything is reserved; 0 = off")})
    max_attempts: int = 3                   # placements tried per attempt before UNAVAILABLE
    place_wait_s: float | None = field(      # router/lifecycle/place.py; finite bounds (5-300 s) brought the
        default=None, metadata={"cli": "--place-wait", "zero_is_none": True, "above": 0,   # fleet collapse back
                                "help": (
            "seconds a deferred placement (no decode worker has KV room for the option the policy prefers) is "
            "asked again after each status poll before its fallback is taken; 0 = until there is room or the "
            "client leaves (bench/RESULTS.md, KV-full fallback)")})
    max_migrations: int = 2                 # lost decode workers survived per request
    local_prefill_max_tokens: int = field(  # prompts this short prefill on the decode worker
        default=0, metadata={"min": 0, "help": "prompts up to this many tokens prefill on the decode worker"})
    remote_prefill: bool = field(default=True, metadata={
        "cli": "--local-prefill", "help": "prefill every request on its decode worker (no remote prefill)"})
    status_interval_s: float = 0.5
    policy: str = field(default=DEFAULT_POLICY, metadata={"choices": POLICY_NAMES, "help": (
        "placement policy (cost-model prices each (prefill, decode) pair and local prefill by cache hits, "
        "learned rates and measured link bandwidth)")})
    block_size: int = CacheConfig.block_size   # the workers' KV block size (prefix hashes are per block);
                                               #   the cluster passes its engine's down (deploy/launch.py)


@dataclass(frozen=True)
class Timeouts:
    """Bounds on every call to a worker, seconds. A call past its bound means a lost worker."""
    prefill_s: float = field(   # one remote prefill incl. its KV transfer (long prompts on CPU)
        default=120.0, metadata={"cli": "--prefill-timeout", "above": 0, "help": (
            "seconds one remote prefill + KV transfer may take before it is recomputed elsewhere")})
    stream_gap_s: float = field(   # reserve, and the longest silence between two token items
        default=60.0, metadata={"cli": "--worker-timeout", "above": 0, "help": (
            "seconds of silence inside a token stream (or for a reserve) after which a decode worker counts as "
            "lost and its requests migrate; a stream's heartbeats count while the engine keeps stepping")})
    health_s: float = field(    # a status poll; a worker that misses it is marked unhealthy
        default=5.0, metadata={"cli": "--health-timeout", "above": 0, "help": (
            "a worker that misses a status poll for this long is unhealthy (no new placements)")})
    control_s: float = 10.0         # abort, prefix-index resync
