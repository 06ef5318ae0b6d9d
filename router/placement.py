"""Placement policy: which (prefill, decode) pair serves a request. Pure Python.

For now `least-loaded`: the prefill worker with the fewest queued prompt tokens and the decode
worker with the most free KV blocks relative to its running requests; prompts shorter than
`local_prefill_max_tokens` (a plain switch until the cost model lands) prefill on the decode worker.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerLoad:
    worker_id: str
    role: str                       # "prefill" | "decode"
    in_flight: int = 0              # requests this router has on it now
    queued_tokens: int = 0          # prompt tokens this router sent and not yet finished (prefill)
    free_blocks: int = 0            # last reported (decode)
    num_blocks: int = 1
    healthy: bool = True
    links: tuple = ()               # prefill: measured KV links [{dst_id, ewma_bytes_per_s, ...}]


@dataclass
class Decision:
    prefill: str | None             # None = prefill locally on the decode worker
    decode: str
    kind: str                       # "remote" | "local"


@dataclass
class LeastLoaded:
    local_prefill_max_tokens: int = 0   # prompts up to this many tokens prefill on the decode worker
    remote_prefill: bool = True

    def choose(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad],
               exclude: set[str] = frozenset()) -> Decision | None:
        ds = [d for d in decodes if d.healthy and d.worker_id not in exclude]
        if not ds:
            return None
        d = min(ds, key=lambda w: (w.in_flight - w.free_blocks / max(w.num_blocks, 1), w.worker_id))
        ps = [p for p in prefills if p.healthy and p.worker_id not in exclude]
        if not self.remote_prefill or not ps or prompt_len <= self.local_prefill_max_tokens:
            return Decision(None, d.worker_id, "local")
        p = min(ps, key=lambda w: (w.queued_tokens, w.in_flight, w.worker_id))
        return Decision(p.worker_id, d.worker_id, "remote")
