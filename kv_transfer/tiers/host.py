"""The host-memory tier's storage: `capacity` block-sized slots (kv_transfer/tiers/block_format.py).

    chunks  [n, 2L, block_size, kv_heads, head_dim] each      stored dtype (the cache's, or int8/fp8);
                                                              slot s is chunks[s // per_chunk][s % per_chunk]
    scales  [capacity, 2L, kv_heads]                         float32, quantizing codecs only
On a CPU host both are fresh calloc'd pages (numpy): capacity costs nothing until a slot is written.
With `pin` (a GPU host) they are page-locked, so loads into the device pool are async DMA copies.
The slots come in chunks of at most CHUNK_BYTES because torch's pinned allocations are rounded up to
a power of two (ATen CachingHostAllocator): one 40 GiB pool would lock 64 GiB, chunks of 256 MiB
lock less than a slot more each (and the last at most twice its size).
Which slot holds which block is the TierIndex's business; this class only moves bytes.
"""
from __future__ import annotations

import numpy as np
import torch

from pdcluster.kv_transfer.tiers.block_format import Geometry, decode, encode


def _host_zeros(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    if pin:
        return torch.zeros(shape, dtype=dtype, pin_memory=True)
    raw = np.zeros(shape[:-1] + (shape[-1] * dtype.itemsize,), dtype=np.uint8)   # calloc: lazy pages
    return torch.from_numpy(raw).view(dtype)


CHUNK_BYTES = 256 * 2**20               # most bytes of slots per allocation (a power of two)


class HostPool:
    def __init__(self, geom: Geometry, capacity: int, pin: bool = False):
        self.geom, self.capacity = geom, capacity
        self.per_chunk = max(1, CHUNK_BYTES // geom.data_bytes)
        self.chunks = [_host_zeros((min(self.per_chunk, capacity - i), *geom.shape), geom.stored_dtype, pin)
                       for i in range(0, capacity, self.per_chunk)]
        self.scales = None if geom.codec == "none" else \
            _host_zeros((capacity, 2 * geom.num_layers, geom.kv_heads), torch.float32, pin)

    def _data(self, slot: int) -> torch.Tensor:
        """Slot's stored data [2L, bs, h, d], a view."""
        if not 0 <= slot < self.capacity:
            raise IndexError(f"slot {slot} of {self.capacity}")
        return self.chunks[slot // self.per_chunk][slot % self.per_chunk]

    def put(self, slot: int, data: torch.Tensor, scales: torch.Tensor | None) -> None:
        """Store an encoded block (block_format.encode's output) in `slot`."""
        self._data(slot).copy_(data)
        if scales is not None:
            self.scales[slot].copy_(scales)

    def put_kv(self, slot: int, kv: torch.Tensor) -> None:
        """Store kv [2L, bs, h, d] (cache dtype) in `slot`, encoding it."""
        self.put(slot, *encode(self.geom, kv))

    def get(self, slot: int) -> torch.Tensor:
        """Slot's block as [2L, bs, h, d] in the cache dtype: a view of the pool for codec none (valid
        while the slot is pinned), a new tensor otherwise."""
        return decode(self.geom, self._data(slot), None if self.scales is None else self.scales[slot])

    def encoded(self, slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Slot's stored bytes as (data, scales) views: what the disk tier writes."""
        return self._data(slot), None if self.scales is None else self.scales[slot]
