"""A worker's numbered log of prefix-cache block events, drained by the router's status poll.

Events are ("stored" | "removed", [chain hashes], tier) from the BlockPool (tier "device") or a lower
cache tier ("host", "disk"), appended on the engine thread or a tier's writer thread.
Sequence numbers let the router's global index spot lost events (a full buffer drops the oldest)
and ask for a full resync.
"""
from __future__ import annotations

import threading
from collections import deque


class BlockEventLog:
    def __init__(self, maxlen: int = 4096):
        self._buf: deque = deque(maxlen=maxlen)
        self._seq = 0
        self._lock = threading.Lock()

    def attach(self, pool) -> None:
        pool.on_event = self.record

    def record(self, kind: str, hashes: list[int], tier: str = "device") -> None:
        with self._lock:
            self._seq += 1
            self._buf.append((self._seq, kind, list(hashes), tier))

    def drain(self) -> tuple[int, list[tuple[int, str, list[int], str]]]:
        """(last sequence number, events since the previous drain)."""
        with self._lock:
            out = list(self._buf)
            self._buf.clear()
            return self._seq, out

    @property
    def seq(self) -> int:
        """The last event's sequence number."""
        with self._lock:
            return self._seq

    def snapshot(self, pool) -> tuple[int, list[int]]:
        """(sequence number, every hash cached now); call on the engine thread so both agree."""
        with self._lock:
            return self._seq, list(pool.cached)
