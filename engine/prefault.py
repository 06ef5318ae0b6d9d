"""Fault in the first blocks of a CPU KV pool in the background, without writing them.

Why: the CPU pool is lazily zeroed memory (model_runner._zeros: calloc'd, fresh mmap'd pages), so each block's
pages fault on their first write, inside a step. A fresh engine pays that on every new block until the pool has
been written once, and on this VM that cost varies a lot: one 4,096-token prefill spent 656 ms in the KV store
instead of 34 (bench/RESULTS.md, "pdcluster's own CPU ops, called directly"). The block pool hands out the lowest
block ids first (engine/block_pool.py: the blank stack), so faulting in the pool's first blocks moves that cost
off the steps that will use them.

How: madvise(MADV_POPULATE_WRITE) (Linux 5.14+) on the first `limit` bytes of each cache tensor, on a daemon
thread (ctypes drops the GIL). It maps the pages writable without touching their contents, so it is safe
while the engine already writes blocks. Bounded (default 1 GiB in all) so a large pool's memory is not all
committed at start; where the call is unsupported (older kernels, other OSes) nothing happens.
"""
from __future__ import annotations

import ctypes
import logging
import sys
import threading

import torch

log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23
PAGE = 4096
DEFAULT_LIMIT = 1 << 30          # bytes over all tensors


def _populate(libc, tensors: list[torch.Tensor], per_tensor: int) -> int:
    """Populate the first per_tensor bytes of each tensor; bytes populated (stops at the first failure)."""
    done = 0
    for t in tensors:
        start = t.data_ptr()
        end = start + min(per_tensor, t.numel() * t.element_size())
        lo, hi = -(-start // PAGE) * PAGE, end // PAGE * PAGE        # whole pages inside the tensor
        if hi <= lo:
            continue
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_POPULATE_WRITE) != 0:
            log.debug("KV pool prefault stopped: madvise errno %d", ctypes.get_errno())
            break
        done += hi - lo
    return done


def prefault(tensors: list[torch.Tensor], limit: int = DEFAULT_LIMIT,
             background: bool = True) -> threading.Thread | None:
    """Fault in the first limit / len(tensors) bytes of each CPU tensor (a layer's K or V cache). Returns the
    thread (background) or None (done in the caller's thread, or skipped: not Linux, no CPU tensor, no limit)."""
    cpu = [t for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel()]
    if not cpu or limit <= 0 or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    per_tensor = limit // len(cpu)
    if not background:
        _populate(libc, cpu, per_tensor)
        return None
    th = threading.Thread(target=_populate, args=(libc, cpu, per_tensor), name="kv-prefault", daemon=True)
    th.start()
    return th
