"""cache-aware: the longest prefix hit in the global index (confidence-weighted), ties by load."""
from __future__ import annotations

from dataclasses import dataclass, field

from pdcluster.router.placement.base import LocalSwitch, Placement
from pdcluster.router.placement.load import WorkerLoad, decode_key, usable
from pdcluster.router.prefix_index import PrefixIndex


@dataclass
class CacheAware(LocalSwitch):
    index: PrefixIndex = field(default_factory=PrefixIndex)

    def choose(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad],
               exclude=frozenset(), *, hashes=None, now=None) -> Placement | None:
        ds = usable(decodes, exclude)
        if not ds:
            return None
        ps = usable(prefills, exclude)
        hits = self.index.match_weighted(hashes, [w.worker_id for w in ps + ds], now) if hashes else {}
        d = min(ds, key=lambda w: (-hits.get(w.worker_id, 0.0), decode_key(w), w.worker_id))
        est = {"hit_blocks_decode": hits.get(d.worker_id, 0.0)}
        if self.local(prompt_len, ps):
            return Placement(None, d.worker_id, "local", est)
        p = min(ps, key=lambda w: (-hits.get(w.worker_id, 0.0), w.queued_tokens, w.in_flight, w.worker_id))
        return Placement(p.worker_id, d.worker_id, "remote", est | {"hit_blocks_prefill": hits.get(p.worker_id, 0.0)})
