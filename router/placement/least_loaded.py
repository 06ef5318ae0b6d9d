"""Placement policy: which (prefill, decode) pair serves a request. Pure Python.

The shared types: `WorkerLoad` (what the router knows of one worker), `Decision` (the answer) and
`LeastLoaded`: the prefill worker with the fewest queued prompt tokens and the decode worker with the
most free KV blocks relative to its running requests; prompts up to `local_prefill_max_tokens`
prefill on the decode worker. The other policies (round-robin, cache-aware, cost-model) live in
`router/policies.py` and `router/cost_model.py`; every policy answers
`choose(prompt_len, prefills, decodes, exclude, *, hashes=None, now=None) -> Decision | None`.
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
    healthy: bool = True            # answered its last status poll
    incarnation: str | None = None  # the worker process's id as last reported; changes on a restart
    kv_address: str = ""            # decode: its advertised KV endpoint (what a probe measures)
    draining: bool = False          # being removed (scale-down): takes no new placements
    links: tuple = ()               # prefill: measured KV links [{dst_id, ewma_bytes_per_s, ...}]
    # optional, for the cache-aware and cost-model policies (defaults keep older callers working)
    zone: str = ""                  # topology label; links inside a zone are priced apart from across
    running: int = 0                # decode: requests in its running batch (last reported)
    waiting_tokens: int = 0         # prefill: prompt tokens waiting in its scheduler (last reported)
    prefill_tps: float | None = None        # prefill rate override, tokens/s (else learned online)
    decode_step_s: tuple | None = None      # decode step-time override (base_s, per_seq_s)

    @property
    def placeable(self) -> bool:
        """May take a new request: answered its last status poll and is not draining."""
        return self.healthy and not self.draining

    @property
    def capacity_known(self) -> bool:
        """False until a status poll reported the KV pool (a fresh WorkerLoad has num_blocks=1)."""
        return self.num_blocks > 1


@dataclass
class Decision:
    prefill: str | None             # None = prefill locally on the decode worker
    decode: str
    kind: str                       # "remote" | "local"
    estimate: dict | None = None    # the policy's breakdown (cost model: TTFT terms in seconds)


@dataclass
class LeastLoaded:
    local_prefill_max_tokens: int = 0   # prompts up to this many tokens prefill on the decode worker
    remote_prefill: bool = True

    def choose(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad],
               exclude: set[str] = frozenset(), *, hashes=None, now=None) -> Decision | None:
        ds = [d for d in decodes if d.placeable and d.worker_id not in exclude]
        if not ds:
            return None
        d = min(ds, key=lambda w: (w.in_flight - w.free_blocks / max(w.num_blocks, 1), w.worker_id))
        ps = [p for p in prefills if p.placeable and p.worker_id not in exclude]
        if not self.remote_prefill or not ps or prompt_len <= self.local_prefill_max_tokens:
            return Decision(None, d.worker_id, "local")
        p = min(ps, key=lambda w: (w.queued_tokens, w.in_flight, w.worker_id))
        return Decision(p.worker_id, d.worker_id, "remote")
