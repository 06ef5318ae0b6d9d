"""CRC-32 (zlib's polynomial and value) of large buffers, as fast as this host allows.

`crc32(data, value)` == `zlib.crc32(data, value)` for every input. libdeflate's crc32 is called
through ctypes, first the copy bundled in the PyPI package `deflate` (a recent libdeflate with
its VPCLMULQDQ/AVX-512 kernel: ~55 GB/s on the bench host, one core), else the system's
libdeflate.so.0 (Debian/Ubuntu package libdeflate0; 1.14 there, PCLMULQDQ only: ~14 GB/s), else
zlib (1.2.13: ~4 GB/s). At loopback speeds the checksum on each side otherwise costs a large
part of the CPU the socket itself does. All release the GIL while they run (ctypes calls always;
zlib for buffers > 5 KiB), so another thread keeps running meanwhile.

Set PDCLUSTER_CRC=zlib to force the fallback (the benchmark compares backends).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import zlib

import numpy as np


def _candidates():
    """(backend name, shared library) pairs that may export libdeflate_crc32, best first."""
    spec = importlib.util.find_spec("deflate._deflate") if importlib.util.find_spec("deflate") else None
    if spec is not None and spec.origin:
        yield "libdeflate (deflate package)", spec.origin  # the extension exports libdeflate's symbols
    for name in ("libdeflate.so.0", ctypes.util.find_library("deflate")):
        if name:
            yield "libdeflate (system)", name


def _load_libdeflate():
    if os.environ.get("PDCLUSTER_CRC", "").lower() == "zlib":
        return None, "zlib"
    for backend, name in _candidates():
        try:
            fn = ctypes.CDLL(name).libdeflate_crc32
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_uint32
        fn.argtypes = (ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t)
        if fn(0, b"123456789", 9) == zlib.crc32(b"123456789"):  # the standard check value
            return fn, backend
    return None, "zlib"


_libdeflate_crc32, BACKEND = _load_libdeflate()


def crc32(data, value: int = 0) -> int:
    """zlib.crc32(data, value) for a C-contiguous bytes-like object (bytes, bytearray, memoryview)."""
    if _libdeflate_crc32 is None:
        return zlib.crc32(data, value)
    arr = np.frombuffer(data, dtype=np.uint8)  # a view: works for read-only buffers too
    if arr.size == 0:
        return value
    return _libdeflate_crc32(value, arr.ctypes.data, arr.size)
