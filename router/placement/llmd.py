"""llm-d: the inference scheduler's weighted scorers (llm-d-inference-scheduler / Gateway API
Inference Extension EPP, as its docs describe them), on this router's view of the workers.

Filter -> score -> pick: every usable worker of the pool gets the weighted sum of scorers that
each answer in [0, 1], and the highest sum wins (max-score-picker; ties here to the lower id):
    prefix-cache-scorer   matched prefix blocks / the prompt's blocks (the index's match, confidence-weighted)
    queue-scorer          (max q - q) / (max q - min q) over the candidates, 1 when all equal;
                          q = requests queued on the worker (this router's in_flight)
    kv-cache-utilization  1 - used KV share (decode: free_blocks / num_blocks; prefill: 1)
                          (the "load" scorer of the issue)
Default weights: prefix 3, queue 2 (the default profile llm-d ships, per the Red Hat docs), load 1.
P/D (pd-profile-handler): the decode profile picks the decode worker first; if the prompt's
tokens beyond that worker's cached prefix are fewer than `pd_threshold` (llm-d's "non-cached suffix
< pdThreshold") it prefills there (decode only), else the prefill profile picks a prefill worker
with the same scorers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pdcluster.engine.config import CacheConfig
from pdcluster.router.placement.base import Placement
from pdcluster.router.placement.load import WorkerLoad, candidates
from pdcluster.router.prefix_index import PrefixIndex


@dataclass
class LlmD:
    index: PrefixIndex = field(default_factory=PrefixIndex)
    block_size: int = CacheConfig.block_size
    prefix_weight: float = 3.0
    queue_weight: float = 2.0
    load_weight: float = 1.0
    pd_threshold: int = 0           # tokens; 0: always P/D when a prefill worker is up
    remote_prefill: bool = True

    def _pick(self, ws: list[WorkerLoad], hits: dict, n_blocks: int) -> WorkerLoad:
        qs = [w.in_flight for w in ws]
        lo, hi = min(qs), max(qs)

        def score(w: WorkerLoad) -> float:
            prefix = hits.get(w.worker_id, 0.0) / n_blocks if n_blocks else 0.0
            queue = 1.0 if hi == lo else (hi - w.in_flight) / (hi - lo)
            load = w.free_blocks / w.num_blocks if w.role == "decode" and w.capacity_known else 1.0
            return self.prefix_weight * prefix + self.queue_weight * queue + self.load_weight * load
        return min(ws, key=lambda w: (-score(w), w.worker_id))

    def choose(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad],
               exclude=frozenset(), *, hashes=None, now=None) -> Placement | None:
        ds, ps, hits = candidates(self.index, prefills, decodes, exclude, self.remote_prefill, hashes, now)
        if not ds:
            return None
        n_blocks = max(1, -(-prompt_len // self.block_size))
        d = self._pick(ds, hits, n_blocks)
        uncached = prompt_len - hits.get(d.worker_id, 0.0) * self.block_size
        est = {"hit_blocks_decode": hits.get(d.worker_id, 0.0)}
        if not ps or uncached < self.pd_threshold:         # (0: always P/D, a whole-prompt hit too)
            return Placement(None, d.worker_id, "local", est)
        p = self._pick(ps, hits, n_blocks)
        return Placement(p.worker_id, d.worker_id, "remote", est | {"hit_blocks_prefill": hits.get(p.worker_id, 0.0)})
