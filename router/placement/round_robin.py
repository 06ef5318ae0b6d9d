"""round-robin: the next prefill and the next decode worker in turn."""
from __future__ import annotations

from dataclasses import dataclass, field

from pdcluster.router.placement.base import LocalSwitch, Placement
from pdcluster.router.placement.load import WorkerLoad, usable


@dataclass
class RoundRobin(LocalSwitch):
    _next_p: int = field(default=0, repr=False)
    _next_d: int = field(default=0, repr=False)

    def choose(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad],
               exclude=frozenset(), *, hashes=None, now=None) -> Placement | None:
        ds = usable(decodes, exclude)
        if not ds:
            return None
        d = ds[self._next_d % len(ds)]
        self._next_d += 1
        ps = usable(prefills, exclude)
        if self.local(prompt_len, ps):
            return Placement(None, d.worker_id, "local")
        p = ps[self._next_p % len(ps)]
        self._next_p += 1
        return Placement(p.worker_id, d.worker_id, "remote")
