"""CPU tensors in transparent huge pages (2 MiB), for the weights a step streams from memory.

Why: a float32 step at a few rows reads every packed linear weight from DRAM (SmolLM2-135M: 425 MB a step). On
4 KiB pages that stream takes a TLB miss every 4 KiB and the hardware prefetcher stops at each page's end; on this
host the layers' linears streamed from DRAM ran 1.06-1.28x faster at 1-24 rows with their weights in huge pages
(two runs), a prefix hit's engine step 1.03-1.04x (bench/hugepages.py; bench/RESULTS.md, "Weights in huge pages").

How: `empty(shape, dtype)` hands out 64-byte aligned views of arena chunks (CHUNK bytes each, anonymous mappings of
their own, 2 MiB aligned, madvise(MADV_HUGEPAGE) before first touch, so the kernel backs them with huge pages where
transparent huge pages are enabled or in `madvise` mode). A chunk lives while any view of it does. Untouched memory of a chunk is not
resident; at most one huge page past the last view is. Tensors larger than CHUNK / 4 get a chunk of their own,
tensors under SMALL stay on torch's allocator.
Where it cannot help or is switched off (not Linux, madvise missing, PDCLUSTER_HUGEPAGES=0) `empty` is
torch.empty.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading

import torch

HUGE = 2 << 20                  # bytes in a huge page (x86-64, arm64 with 4 KiB base pages)
CHUNK = 64 << 20                # bytes per arena chunk
ALIGN = 64                      # each view's start: a cache line
SMALL = 64 << 10                # tensors under this stay on torch's allocator (norms, biases: read once, cached)
MADV_HUGEPAGE = 14


def _madvise():
    """libc's madvise, or None where this cannot work."""
    if not sys.platform.startswith("linux") or os.environ.get("PDCLUSTER_HUGEPAGES", "1") == "0":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


class Arena:
    """A bump allocator over huge-page chunks. Thread-safe; views are never freed one by one."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self._madvise = _madvise()
        self._lock = threading.Lock()
        self._cur: torch.Tensor | None = None      # uint8, the open chunk (2 MiB aligned)
        self._off = 0
        self.huge_bytes = 0                         # bytes advised so far (all chunks)

    def _new_chunk(self, nbytes: int) -> torch.Tensor:
        """A 2 MiB-aligned uint8 view of a fresh anonymous mapping, advised. Its own mapping, not malloc's: the
        advice must not stay on heap memory that malloc hands out again after the chunk is freed (unmapped when
        the last view goes: the tensor holds the mmap object)."""
        size = -(-nbytes // HUGE) * HUGE
        raw = torch.frombuffer(mmap.mmap(-1, size + HUGE), dtype=torch.uint8)
        start = (-raw.data_ptr()) % HUGE
        buf = raw[start:start + size]               # a view: keeps raw's storage alive
        if self._madvise(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(size), MADV_HUGEPAGE) == 0:
            self.huge_bytes += size
        return buf

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = torch.Size(shape).numel() * dtype.itemsize
        if self._madvise is None or n < SMALL:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            if n > self.chunk // 4:
                buf = self._new_chunk(n)
                return buf[:n].view(dtype).view(shape)
            if self._cur is None or self._off + n > self._cur.numel():
                self._cur, self._off = self._new_chunk(self.chunk), 0
            view = self._cur[self._off:self._off + n]
            self._off += -(-n // ALIGN) * ALIGN
        return view.view(dtype).view(shape)


_ARENA = Arena()


def empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialized CPU tensor, in huge pages where the host allows (the process's arena)."""
    return _ARENA.empty(shape, dtype)
