"""One cache tier's bookkeeping: chain hash -> slot, capacity, segmented LRU, pins. Pure Python.

A tier (host memory, disk) holds at most `capacity` blocks, each in a slot 0..capacity-1 (the host
pool's buffer index; the disk tier's file count). Invariants:
- Every entry is in exactly one of `probation` or `protected` (OrderedDicts, LRU first).
- Eviction is the device pool's segmented LRU (engine/block_pool.py): a new entry joins probation;
  an entry loaded back (`hit`) joins protected, which holds at most `protected_fraction` of the
  capacity (its LRU is demoted to probation's MRU end past that). Victims come from probation's
  LRU end first, then protected's.
- A pinned entry (being loaded into the device pool, or written) is never evicted nor removed
  until its pins are dropped; `insert` fails (None) when every entry is pinned. A new entry is not
  `ready` (its bytes are still being written) until its writer says so; only ready ones are loaded.
- An entry found bad while others pin it (`doom`) is unready and leaves when its last pin drops
  (`unpin` says so, so its owner can announce the removal).
Not thread-safe: the tier's owner holds a lock around every call.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Entry:
    slot: int
    pins: int = 0
    ready: bool = False     # its bytes are all written (set by the writer): only then may it be loaded
    doomed: bool = False    # found bad while pinned: removed at its last unpin


class TierIndex:
    def __init__(self, capacity: int, protected_fraction: float = 0.9):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if not 0.0 <= protected_fraction <= 1.0:
            raise ValueError(f"protected_fraction must be in [0, 1], got {protected_fraction}")
        self.capacity = capacity
        self.max_protected = int(protected_fraction * capacity)
        self.entries: dict[int, Entry] = {}
        self.probation: OrderedDict[int, None] = OrderedDict()
        self.protected: OrderedDict[int, None] = OrderedDict()
        self._free_slots = list(range(capacity - 1, -1, -1))     # pop() hands out slot 0 first

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, block_hash: int) -> Entry | None:
        return self.entries.get(block_hash)

    def insert(self, block_hash: int) -> tuple[int, list[tuple[int, int]]] | None:
        """A slot for block_hash, and the (hash, slot) entries evicted to make room (their slots are
        free now: one of them may be the one returned). An entry already here only moves to its
        segment's MRU end (slot returned, nothing evicted). None: no room (capacity 0, or every
        entry pinned)."""
        e = self.entries.get(block_hash)
        if e is not None:
            seg = self.protected if block_hash in self.protected else self.probation
            seg.move_to_end(block_hash)
            return e.slot, []
        victims = []
        if not self._free_slots:
            victim = self._victim()
            if victim is None:
                return None
            victims.append((victim, self._drop(victim)))
        slot = self._free_slots.pop()
        self.entries[block_hash] = Entry(slot)
        self.probation[block_hash] = None
        return slot, victims

    def hit(self, block_hash: int) -> None:
        """block_hash was loaded back: protect it (MRU of protected), demoting protected's LRU past the cap."""
        if block_hash not in self.entries:
            return
        self.probation.pop(block_hash, None)
        self.protected.pop(block_hash, None)
        self.protected[block_hash] = None
        while len(self.protected) > self.max_protected:
            h, _ = self.protected.popitem(last=False)
            self.probation[h] = None

    def pin(self, block_hash: int) -> Entry | None:
        e = self.entries.get(block_hash)
        if e is not None:
            e.pins += 1
        return e

    def unpin(self, block_hash: int) -> bool:
        """Drop one pin; True when that removed a doomed entry (its slot is free now)."""
        e = self.entries.get(block_hash)
        if e is not None and e.pins > 0:
            e.pins -= 1
            if not e.pins and e.doomed:
                self._drop(block_hash)
                return True
        return False

    def doom(self, block_hash: int) -> bool:
        """block_hash is bad (a corrupt or unreadable file): removed now if unpinned (True), else
        unready until its last pin drops (False; unpin removes it then)."""
        e = self.entries.get(block_hash)
        if e is None:
            return False
        e.ready, e.doomed = False, True
        return self.remove(block_hash) is not None

    def remove(self, block_hash: int) -> int | None:
        """Forget block_hash (a corrupt file, a failed write); its slot, or None if absent or pinned."""
        e = self.entries.get(block_hash)
        if e is None or e.pins:
            return None
        return self._drop(block_hash)

    def hashes(self) -> list[int]:
        """Every hash held, LRU first within probation, then protected."""
        return list(self.probation) + list(self.protected)

    def _victim(self) -> int | None:
        for seg in (self.probation, self.protected):
            for h in seg:
                if not self.entries[h].pins:
                    return h
        return None

    def _drop(self, block_hash: int) -> int:
        e = self.entries.pop(block_hash)
        self.probation.pop(block_hash, None)
        self.protected.pop(block_hash, None)
        self._free_slots.append(e.slot)
        return e.slot
