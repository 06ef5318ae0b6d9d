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

Request rejection (Dynamo docs, "Request Rejection"; off by default, as there): a worker is busy when
its KV blocks in use / its pool > busy_decode_blocks (--active-decode-blocks-threshold, decode
workers) or its active prompt tokens > busy_prefill_tokens (--active-prefill-tokens-threshold).
Busy workers take no placement; when every usable worker of a pool the request needs is busy, the
request is refused (Overloaded: RESOURCE_EXHAUSTED, HTTP 429; Dynamo answers 529 or 503).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pdcluster.engine.config import CacheConfig
from pdcluster.router.errors import Overloaded
from pdcluster.router.placement.base import Placement
from pdcluster.router.placement.load import WorkerLoad, candidates
from pdcluster.router.prefix_index import PrefixIndex


@dataclass
class DynamoKV:
    index: PrefixIndex = field(default_factory=PrefixIndex)
    block_size: int = CacheConfig.block_size
    overlap_score_weight: float = 1.0
    remote_prefill: bool = True
    busy_decode_blocks: float | None = None     # fraction of a decode worker's KV blocks in use (None: off)
    busy_prefill_tokens: int | None = None      # a worker's active prompt tokens (None: off)

    def _busy(self, w: WorkerLoad) -> bool:
        if self.busy_prefill_tokens is not None and max(w.queued_tokens, w.waiting_tokens) > self.busy_prefill_tokens:
            return True
        return (self.busy_decode_blocks is not None and w.role == "decode" and w.capacity_known
                and (w.num_blocks - w.free_blocks) / w.num_blocks > self.busy_decode_blocks)

    def _not_busy(self, ws: list[WorkerLoad], pool: str) -> list[WorkerLoad]:
        """ws without its busy workers; Overloaded when that leaves none of a non-empty ws."""
        if self.busy_decode_blocks is None and self.busy_prefill_tokens is None:
            return ws
        free = [w for w in ws if not self._busy(w)]
        if ws and not free:
            raise Overloaded(f"every {pool} worker is busy (busy thresholds): retry later")
        return free

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
        ds, ps = self._not_busy(ds, "decode"), self._not_busy(ps, "prefill")
        pick = lambda ws: min(ws, key=lambda w: (self._cost(w, prompt_len, hits.get(w.worker_id, 0.0)),  # noqa: E731
                                                 w.worker_id))
        d = pick(ds)
        if not ps:
            return Placement(None, d.worker_id, "local", {"hit_blocks_decode": hits.get(d.worker_id, 0.0)})
        p = pick(ps)
        return Placement(p.worker_id, d.worker_id, "remote", {"hit_blocks_prefill": hits.get(p.worker_id, 0.0)})
