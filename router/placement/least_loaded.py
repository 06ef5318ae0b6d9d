"""least-loaded: the prefill worker with the fewest queued prompt tokens, the decode worker with the
most free KV blocks relative to its requests."""
from __future__ import annotations

from dataclasses import dataclass

from pdcluster.router.placement.base import LocalSwitch, Placement
from pdcluster.router.placement.load import WorkerLoad, decode_key, usable


@dataclass
class LeastLoaded(LocalSwitch):
    def choose(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad],
               exclude=frozenset(), *, hashes=None, now=None) -> Placement | None:
        ds = usable(decodes, exclude)
        if not ds:
            return None
        d = min(ds, key=lambda w: (decode_key(w), w.worker_id))
        ps = usable(prefills, exclude)
        if self.local(prompt_len, ps):
            return Placement(None, d.worker_id, "local")
        p = min(ps, key=lambda w: (w.queued_tokens, w.in_flight, w.worker_id))
        return Placement(p.worker_id, d.worker_id, "remote")
