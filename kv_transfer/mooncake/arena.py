"""The prefill side's staging arena: one registered buffer cut into equal slots.

    buffer  | slot 0 | slot 1 | ... | slot n-1 |     each slot_bytes, 64-byte aligned
    a slot  | K bytes of m blocks | V bytes of m blocks | unused |   (one staged chunk)

Ownership: a slot is free, or held by exactly one sender from `acquire` until `release`. The
sender releases it only when the decode side reported the chunk read (or the stream ended, so no
read of it is pending). `acquire` blocks while the arena is full (back-pressure on the stager
thread, never the compute thread) and fails after `timeout` seconds.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import torch

_ALIGN = 64  # bytes


class ArenaFull(Exception):
    """No slot became free within the timeout."""


class SlotPool:
    """Pure bookkeeping of `n` slot indices; thread-safe."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"need at least one slot, got {n}")
        self.n = n
        self._free = list(range(n - 1, -1, -1))  # a stack: pop() gives the lowest index first
        self._cond = threading.Condition()

    @property
    def num_free(self) -> int:
        with self._cond:
            return len(self._free)

    def acquire(self, timeout: float, stop: Callable[[], bool] = lambda: False) -> int | None:
        """A free slot; None if stop() turned true meanwhile (checked on every wake-up); raises
        ArenaFull after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._free:
                if stop():
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ArenaFull(f"all {self.n} staging slots held for {timeout:.1f}s")
                self._cond.wait(left)
            return None if stop() else self._free.pop()

    def release(self, slot: int) -> None:
        with self._cond:
            if not 0 <= slot < self.n or slot in self._free:
                raise ValueError(f"slot {slot} is not held")
            self._free.append(slot)
            self._cond.notify()

    def wake(self) -> None:
        """Wake every waiter (one of them was told to stop)."""
        with self._cond:
            self._cond.notify_all()


class StagingArena(SlotPool):
    """SlotPool over a CPU uint8 buffer of n * slot_bytes (registered by the caller)."""

    def __init__(self, total_bytes: int, slot_bytes: int):
        slot_bytes = -(-slot_bytes // _ALIGN) * _ALIGN
        super().__init__(total_bytes // slot_bytes)
        self.slot_bytes = slot_bytes
        self.buffer = torch.empty(self.n * slot_bytes, dtype=torch.uint8)

    def view(self, slot: int, nbytes: int) -> torch.Tensor:
        """The first nbytes of a slot, as uint8."""
        lo = slot * self.slot_bytes
        return self.buffer[lo:lo + nbytes]

    def address(self, slot: int) -> int:
        return self.buffer.data_ptr() + slot * self.slot_bytes
