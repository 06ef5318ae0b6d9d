"""Dynamo's KV router cost (NVIDIA Dynamo docs, "Routing Concepts"), on this router's view.

Per worker, lowest wins (router temperature 0: deterministic; ties here to the lower id):
    cost = overlap_score_weight * prefill_blocks + decode_blocks
    prefill_blocks = (prompt tokens queued on the worker + the prompt's tokens beyond its cached
                      prefix) / block size           (active prompt load + new uncached work)
    decode_blocks  = KV blocks in use on the worker + the prompt's blocks
                     (decode workers: num_blocks - free_blocks; prefill workers hold none)
Disaggregated: the prefill worker is the lowest-cost prefill worker and the decode worker the
lowest-cost decode worker (each pool routed by the same cost); with no prefill worker up (or
remote prefill off), the decode worker prefills itself (aggregated mode). overlap_score_weight 1.0
is Dynamo's default.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pdcluster.engine.config import CacheConfig
from pdcluster.router.placement.base import Placement
from pdcluster.router.placement.load import WorkerLoad, candidates
from pdcluster.router.prefix_index import PrefixIndex


@dataclass
class DynamoKV:
    index: PrefixIndex = field(default_factory=PrefixIndex)
    block_size: int = CacheConfig.block_size
    overlap_score_weight: float = 1.0
    remote_prefill: bool = True

    def _cost(self, w: WorkerLoad, prompt_len: int, hit_blocks: float) -> float:
        bs = self.block_size
        queued = max(w.queued_tokens, w.waiting_tokens)
        prefill_blocks = (queued + max(0.0, prompt_len - hit_blocks * bs)) / bs
        used = (w.num_blocks - w.free_blocks) if w.role == "decode" and w.capacity_known else 0
        return self.overlap_score_weight * prefill_blocks + used + -(-prompt_len // bs)

    def choose(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad],
               exclude=frozenset(), *, hashes=None, now=None) -> Placement | None:
        ds, ps, hits = candidates(self.index, prefills, decodes, exclude, self.remote_prefill, hashes, now)
        if not ds:
            return None
        pick = lambda ws: min(ws, key=lambda w: (self._cost(w, prompt_len, hits.get(w.worker_id, 0.0)),  # noqa: E731
                                                 w.worker_id))
        d = pick(ds)
        if not ps:
            return Placement(None, d.worker_id, "local", {"hit_blocks_decode": hits.get(d.worker_id, 0.0)})
        p = pick(ps)
        return Placement(p.worker_id, d.worker_id, "remote", {"hit_blocks_prefill": hits.get(p.worker_id, 0.0)})
