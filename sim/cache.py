"""An instance's prefix cache: block LRU with a capacity, as block events. Pure Python.

Blocks are chain hashes (a block names its whole prefix), so `lookup` returns the longest cached
prefix. Every change is numbered like an engine's BlockEventLog: ("stored" | "removed", hashes)
with seq 1, 2, ...; `drain()` hands them to the status poll (WorkerRegistry._ingest feeds them to the
router's PrefixIndex). With lower tiers (sim/tiers.py) `on_evict` takes every evicted batch and the
tiers log their own changes here too, as (seq, kind, hashes, tier): one sequence per worker."""
from __future__ import annotations

from collections import OrderedDict


class PrefixCache:
    def __init__(self, capacity_blocks: int):
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must be >= 0")
        self.capacity = capacity_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()      # oldest first
        self.seq = 0
        self._events: list[tuple] = []       # (seq, kind, hashes) device; (seq, kind, hashes, tier) lower
        self.on_evict = None                 # callable(hashes): the evicted blocks (the tiers write them)

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, h: int) -> bool:
        return h in self._lru

    def lookup(self, hashes) -> int:
        """Blocks of the longest cached prefix; they become the most recently used."""
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            n += 1
        for h in hashes[:n]:
            self._lru.move_to_end(h)
        return n

    def insert(self, hashes) -> None:
        """Cache these blocks (most recent now); evict the least recently used past capacity."""
        new = []
        for h in hashes:
            if h in self._lru:
                self._lru.move_to_end(h)
            else:
                self._lru[h] = None
                new.append(h)
        if new:
            self._log("stored", new)
        self._evict()

    def resize(self, capacity_blocks: int) -> None:
        self.capacity = max(0, capacity_blocks)
        self._evict()

    def _evict(self) -> None:
        gone = []
        while len(self._lru) > self.capacity:
            gone.append(self._lru.popitem(last=False)[0])
        if gone:
            self._log("removed", gone)
            if self.on_evict is not None:
                self.on_evict(gone)

    def _log(self, kind: str, hashes: list[int], tier: str = "device") -> None:
        self.seq += 1
        self._events.append((self.seq, kind, hashes) if tier == "device" else (self.seq, kind, hashes, tier))

    def drain(self) -> tuple[int, list[tuple]]:
        """(last seq, events since the last drain)."""
        ev, self._events = self._events, []
        return self.seq, ev
