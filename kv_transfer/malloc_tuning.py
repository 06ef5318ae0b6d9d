"""Keep large message buffers on the heap instead of mmap/munmap per message (glibc only).

Every KV frame is a fresh ~1 MiB `bytes` on both sides (the sender's join, gRPC's received
message). By default glibc may serve such sizes with mmap and return them with munmap, so a
message costs ~256 page faults of zeroed memory; in the loopback benchmark that was a large share
of the receiver's system CPU. Raising M_MMAP_THRESHOLD to 32 MiB (glibc's cap) and
M_TRIM_THRESHOLD to 1 GiB lets freed frames be reused; the price is that up to ~1 GiB of freed
heap may stay mapped. Process-wide, so it is applied once, by the first KVServer or
GrpcKVTransport; a no-op where mallopt is missing (musl, macOS).
"""
from __future__ import annotations

import ctypes
import functools

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h> parameter numbers
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30


@functools.cache
def keep_large_buffers() -> bool:
    """Apply the thresholds (once per process); True if mallopt accepted both."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own libc
    except (OSError, AttributeError):
        return False
    return (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
            and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
